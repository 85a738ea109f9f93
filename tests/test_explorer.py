"""The ablation explorer: its callbacks called directly, then the page served by Voila and driven in a real
browser (headless Chromium): it loads without console errors, the widgets render, changing a control changes the
plot, selecting a run shows its gallery. A screenshot is kept under build/test-artifacts/."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ARTIFACTS, ROOT
from infusing_kit.teaching.explorer import AblationExplorer, gallery_from_run


def _rows(n_methods=3, seeds=(0, 1, 2)):
    rng = np.random.default_rng(0)
    rows = []
    for m in ["toy-naive", "toy-paper", "toy-l2sp"][:n_methods]:
        for s in seeds:
            g = lambda: {"map@20": float(rng.random()), "mmp@20": 0.5, "r@1": 0.5}
            rows.append({"method": m, "seed": s, "smoke": False, "best_step": 100,
                         "updates": {"target": 300, "generic": 0},
                         "pretrained": {"in_domain": g(), "generic_image": g(), "image_text": {"i2t_r@1": 0.7}},
                         "finetuned": {"in_domain": g(), "generic_image": g(),
                                       "image_text": {"i2t_r@1": float(rng.random())}}})
    return rows


def _trials():
    return [{"method": "toy-l2sp", "state": "complete", "params": {"l2sp": v},
             "val": {"fine_map@20": 1 / (1 + v / 100), "generic_map@20": v / (100 + v),
                     "mean_map@20": 0.5 - abs(np.log10(v) - 2) / 10}} for v in (0.1, 1, 10, 100, 1e3, 1e4)]


def test_controls_change_what_is_drawn():
    e = AblationExplorer(_rows(), _trials())
    before, png = e.points(), e.plot_out.outputs[0]["data"]["image/png"]
    e.x.value = "generic"
    after = e.draw()
    assert e.plot_out.outputs[0]["data"]["image/png"] != png, "the plot widget still shows the old figure"
    assert set(after) == set(before) and all(not np.array_equal(before[m], after[m]) for m in after)
    e.seeds.value = (0,)
    assert all(len(p) == 1 for p in e.points().values())
    assert len(e.run.options) == 3, "the run menu follows the selected seeds"
    e.methods.value = ("toy-paper",)
    assert list(e.points()) == ["toy-paper"] and [s["method"] for s in e.draw_figure1()] == ["toy-paper"]


def test_a_run_shows_its_metrics_and_the_slider_walks_the_sweep():
    e = AblationExplorer(_rows(), _trials())
    table = e.run_table(0)
    r = e.rows[0]
    want = r["finetuned"]["in_domain"]["map@20"] - r["pretrained"]["in_domain"]["map@20"]
    assert "in_domain/map@20" in table and f"{want:+.3f}" in table
    s = e.sweep("toy-l2sp", 0.1)
    assert s["highlight"]["params"]["l2sp"] == 0.1 and s["chosen"]["params"]["l2sp"] == 100
    e.sweep_method.value = "toy-l2sp"
    e.strength.value = 1e4
    assert e.draw_sweep()["highlight"]["params"]["l2sp"] == 1e4
    assert e.gallery_data(0) is None  # no model here, no committed gallery: the panel says so


def test_the_page_reads_a_registry_or_a_compare_folder(tmp_path):
    from infusing_kit.teaching.explorer import page_data
    rows = _rows()
    rows[0]["smoke"] = True
    write = lambda path, items: path.write_text("".join(json.dumps(r) + "\n" for r in items))
    write(tmp_path / "results.jsonl", rows)
    write(tmp_path / "trials.jsonl", _trials())
    got, trials, galleries = page_data(tmp_path, trials="/nowhere.jsonl", galleries=None)
    assert len(got) == len(rows) and len(trials) == 6 and galleries == {}  # a folder: all its rows, its own trials
    got, trials, _ = page_data(tmp_path / "results.jsonl", tmp_path / "trials.jsonl")
    assert len(got) == len(rows) - 1 and len(trials) == 6  # a registry: its non-smoke rows
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no results.jsonl"):
        page_data(tmp_path / "empty")


@pytest.mark.slow
def test_a_run_made_here_gets_a_live_gallery(smoke_reference):
    g = gallery_from_run(smoke_reference, n_queries=4)
    assert len(g["queries"]) == 4 and np.array(g["after"]).shape == (4, 5)
    assert all(q not in row for q, row in zip(g["queries"], g["after"])), "the query itself is not its neighbour"
    row = json.loads((smoke_reference.parent / "results.jsonl").read_text().splitlines()[0])
    e = AblationExplorer([row])
    shown = e.show_gallery()
    assert shown is not None and len(shown["queries"]) == 6 and np.array(shown["before"]).shape == (6, 5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_explorer_page_works_in_a_real_browser(tmp_path, browser, smoke_reference):
    import papermill
    # the page on test data: three methods over three seeds, one run with its model (a live gallery), a search
    rows = _rows()
    live = json.loads((smoke_reference.parent / "results.jsonl").read_text().splitlines()[0])
    live["method"], live["seed"], live["smoke"] = "toy-naive", 0, False  # the page reads non-SMOKE rows
    rows = [r for r in rows if not (r["method"] == "toy-naive" and r["seed"] == 0)] + [live]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(t) + "\n" for t in _trials()))
    nb = papermill.parameterize.parameterize_notebook(
        papermill.iorw.load_notebook_node(str(ROOT / "notebooks" / "explorer_page.ipynb")),
        {"COMPARISON": str(tmp_path / "rows.jsonl"), "TRIALS": str(tmp_path / "trials.jsonl"),
         "GALLERIES": str(tmp_path / "none.json")})
    papermill.iorw.write_ipynb(nb, str(tmp_path / "explorer.ipynb"))
    port = _free_port()
    voila = subprocess.Popen([str(Path(sys.executable).with_name("voila")), str(tmp_path / "explorer.ipynb"),
                              f"--port={port}", "--Voila.ip=127.0.0.1", "--no-browser", "--template=offline"],
                             cwd=tmp_path,
                             env={**os.environ, "TQDM_DISABLE": "1", "JUPYTER_PATH": str(ROOT / "share" / "jupyter")},
                             stdout=open(tmp_path / "voila.log", "w"), stderr=subprocess.STDOUT)
    t0 = time.time()
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 1800})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        for _ in range(480):  # the server needs a few seconds to start
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.25)
        page.goto(f"http://127.0.0.1:{port}/", timeout=300_000, wait_until="commit")  # it streams as cells run
        try:
            page.wait_for_selector(".widget-select-multiple select", timeout=240_000)
        except Exception:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "explorer-failed.png"), full_page=True)
            import psutil
            kernels = [(p.pid, p.cpu_times(), " ".join(p.cmdline())[-80:]) for p in psutil.process_iter()
                       if "ipykernel" in " ".join(p.cmdline())]
            raise AssertionError(f"no widgets after 240 s; the page shows: {page.inner_text('body')[-2000:]}; "
                                 f"kernels {kernels}; voila log: {(tmp_path / 'voila.log').read_text()[-3000:]}")
        page.wait_for_function("document.querySelectorAll('.jp-OutputArea-output img').length >= 3", timeout=180_000)
        assert "import" not in page.inner_text("body"), "code is shown on the page"

        def plot_src():
            return page.eval_on_selector_all(".jp-OutputArea-output img", "els => els.map(e => e.src)")

        first = plot_src()
        x_menu = page.locator("select").nth(2)  # methods, seeds, then the x axis menu
        x_menu.select_option(index=1)
        page.wait_for_function(f"document.querySelector('.jp-OutputArea-output img').src !== {json.dumps(first[0])}",
                               timeout=60_000)
        assert plot_src()[0] != first[0], "changing the x axis did not redraw the trade-off plot"
        run_menu = page.locator("select").nth(4)
        labels = run_menu.locator("option").all_inner_texts()  # widgets render spaces as no-break spaces
        live_label = next(o for o in labels if o.replace("\xa0", " ").startswith("toy-naive · seed 0"))
        before = len(plot_src())
        run_menu.select_option(label=live_label)
        page.wait_for_function(f"document.querySelectorAll('.jp-OutputArea-output img').length > {before}",
                               timeout=120_000)
        assert "in_domain/map@20" in page.inner_text("body")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "explorer.png"), full_page=True)
        assert not errors, errors
        print(f"explorer page: {time.time() - t0:.0f} s from server start to the last check")
    finally:
        voila.terminate()
        try:
            voila.wait(timeout=30)
        except subprocess.TimeoutExpired:
            voila.kill()


def test_load_run_reads_model_files_from_before_they_named_their_model(tmp_path, smoke_reference):
    import shutil
    import torch
    from infusing_kit.protocol.experiment import load_run
    run = tmp_path / "old-run"
    run.mkdir()
    shutil.copy(smoke_reference / "metrics.json", run / "metrics.json")
    new = torch.load(smoke_reference / "model.pt", map_location="cpu", weights_only=True)
    torch.save({"visual": new["visual"], "head": new["head"]}, run / "model.pt")  # the layout of commits <= 109d7af
    old, current = load_run(run)[1], load_run(smoke_reference)[1]
    assert all(torch.equal(v, current.visual.state_dict()[k]) for k, v in old.visual.state_dict().items())


def test_the_sweep_marks_the_trial_chosen_on_the_key_the_trials_selected_on():
    """A trial row carries its whole config: the sweep marks the best trial on that config's selection key (a
    study of your own may select a baseline on the mean, or a method on fine-grained validation), not on a key
    guessed from the method's name."""
    e = AblationExplorer(_rows(), _trials())
    assert e.sweep("toy-l2sp")["chosen"]["params"]["l2sp"] == 100  # no recorded key: the mean for a method
    fine = [dict(t, train={"select": "fine_map@20"}) for t in _trials()]
    assert AblationExplorer(_rows(), fine).sweep("toy-l2sp")["chosen"]["params"]["l2sp"] == 0.1


def test_a_chapters_sweeps_are_one_figure_on_each_searchs_own_scale(tmp_path):
    """Chapters 04-07 draw their strength sweeps through one call (`Compared.sweeps`); each panel's scale is the one
    its preset's search used (LP-FT's steps: linear; strengths: log), and without trials there is no figure."""
    from infusing_kit.teaching.chapters import Compared
    lp = [{"method": "toy-lp-ft", "state": "complete", "params": {"lp_ft_steps": v},
           "val": {"fine_map@20": 0.5, "generic_map@20": 0.5, "mean_map@20": 0.5}} for v in (0, 10, 100, 500)]
    path = tmp_path / "trials.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in _trials() + lp))
    fig, trials = Compared([], {}, "test", path).sweeps({"toy-l2sp": "l2sp", "toy-lp-ft": "lp_ft_steps"})
    assert [a.get_xscale() for a in fig.axes] == ["log", "linear"]
    assert [t["params"]["l2sp"] for t in trials["toy-l2sp"]] == [0.1, 1, 10, 100, 1e3, 1e4]
    assert Compared([], {}, "trained here", None).sweeps({"toy-l2sp": "l2sp"}) == (None, {"toy-l2sp": []})


def test_a_chapter_names_its_methods_from_the_study_and_says_what_it_lacks(world, tmp_path):
    """Chapters 04-07 on a study file: each preset's part is played by the study's method of that name, the
    baseline's by the study's baseline whatever its name (`methods_of`); a study without one of a chapter's methods
    is refused with what to add, an optional section's missing methods are listed (`lacks`: the chapter skips it);
    a registry of the study's comparison gives each method's rows on the seeds all of them ran, under the study's
    names, and trains nothing (`compared(config=...)`)."""
    import re

    from infusing_kit.teaching import chapters
    configs = world / "configs"
    text = (configs / "quick-study.toml").read_text()  # your own study: the baseline named "naive", no EWC
    text = re.sub(r'(?<!preset = )"toy-naive"', '"naive"', text).replace("[study.method.toy-naive]", "[study.method.naive]")
    text = re.sub(r'"toy-ewc", |, "toy-ewc"', "", text)
    text = re.sub(r"\[study\.method\.toy-ewc\]\n(?:[^\[\n][^\n]*\n)*", "", text)
    mine = configs / "mine.toml"
    mine.write_text(text)
    assert chapters.methods_of(["toy-naive", "toy-l2sp", "toy-spd"], mine) == ["naive", "toy-l2sp", "toy-spd"]
    assert chapters.methods_of(["toy-naive", "toy-l2sp"], None) == ["toy-naive", "toy-l2sp"]
    assert chapters.lacks(["toy-naive", "toy-ewc", "toy-tpgm"], mine) == ["toy-ewc"] and not chapters.lacks(["toy-ewc"], None)
    with pytest.raises(ValueError, match=r"no method for \['toy-ewc'\]"):
        chapters.methods_of(["toy-naive", "toy-l2sp", "toy-ewc"], mine)
    with pytest.raises(ValueError, match="experiment file"):
        chapters.methods_of(["toy-naive", "toy-l2sp"], configs / "toy-l2sp.toml")
    assert chapters.train_config("toy-l2sp", mine).steps == 20  # the study's own schedule, whatever SMOKE says
    assert chapters.train_config("toy-naive", mine, smoke=True) == chapters.train_config("toy-naive", None, smoke=True)
    rows = [dict(r, method="naive" if r["method"] == "toy-naive" else r["method"]) for r in _rows()]
    rows.append(dict(rows[0], seed=3))  # a seed the others did not run
    registry = tmp_path / "results.jsonl"
    registry.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = chapters.compared(["toy-naive", "toy-paper", "toy-l2sp"], tmp_path / "runs", config=mine, comparison=registry)
    assert sorted({r["method"] for r in got.rows}) == ["naive", "toy-l2sp", "toy-paper"], got.rows
    assert {r["seed"] for r in got.rows} == {0, 1, 2} and len(got.rows) == 9 and "seeds 0-2" in got.source
    assert got.histories == {} and got.trials_path is None and not (tmp_path / "runs").exists()
