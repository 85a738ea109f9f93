"""Every notebook runs headless with papermill in SMOKE mode (fresh kernel, shared results folder).

A failing cell, including a chapter's assertion that its phenomenon shows, fails the test with the cell's
traceback (papermill's PapermillExecutionError). The runs the chapters share are computed once per session."""
import pytest

from infusing_kit.notebook_runner import notebook_paths, run_notebook

PATHS = notebook_paths()


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebooks")
    return {"results": root / "results", "figures": root / "figures", "executed": root / "executed"}


def test_there_is_a_numbered_series():
    names = [p.name[:2] for p in PATHS]
    assert names == sorted(names) and {"00", "01", "02", "03", "10"} <= set(names), names


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs_in_smoke_mode(path, shared):
    seconds = run_notebook(path, shared["executed"], smoke=True, results_dir=shared["results"],
                           figures_dir=shared["figures"], timeout=900)
    print(f"{path.name}: {seconds:.0f} s")
