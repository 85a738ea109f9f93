"""Execute the notebook series headless with papermill (used by `make run` and the tests).

  python -m infusing_kit.notebook_runner --out build/notebooks [--smoke] [--only 02 03]

Each notebook runs in a fresh kernel with its `parameters` cell overridden (SMOKE, OUT_DIR);
executed copies land in --out, the source notebooks stay clean. A failing cell stops the run with
that cell's error and the path of the executed copy, which shows everything up to the failure.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    return paths


def run_notebook(path: Path, out_dir: Path, smoke: bool, results_dir: Path | None = None,
                 figures_dir: Path | None = None, timeout: int = 1800) -> float:
    """Execute one notebook; returns its wall time in seconds. Raises papermill's error on a failing cell."""
    import papermill as pm
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"SMOKE": smoke}
    if results_dir is not None:
        params["RESULTS_DIR"] = str(Path(results_dir).resolve())
    if figures_dir is not None:
        params["FIGURES_DIR"] = str(Path(figures_dir).resolve())
    t0 = time.time()
    pm.execute_notebook(str(path), str(out_dir / path.name), parameters=params, kernel_name="python3",
                        cwd=str(path.parent), progress_bar=False, execution_timeout=timeout)
    return time.time() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "build" / "notebooks"), help="folder for the executed copies")
    ap.add_argument("--smoke", action="store_true", help="SMOKE=True: tiny settings, as in CI")
    ap.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 02 03")
    args = ap.parse_args(argv)
    paths = notebook_paths(args.only)
    if not paths:
        print(f"no notebooks matched in {NOTEBOOKS}", file=sys.stderr)
        return 1
    total = 0.0
    for p in paths:
        print(f"running {p.name} (SMOKE={args.smoke}) ...", flush=True)
        seconds = run_notebook(p, Path(args.out), args.smoke)
        total += seconds
        print(f"  done in {seconds:.0f} s -> {Path(args.out) / p.name}", flush=True)
    print(f"{len(paths)} notebooks in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
