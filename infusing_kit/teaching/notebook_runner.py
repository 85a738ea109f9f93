"""Execute the notebook series headless with papermill, and render it as a static course site.

  python -m infusing_kit.teaching.notebook_runner --out build/notebooks [--smoke] [--only 02 03] [--html build/html]
                                         [--figures build/figures]

Each notebook runs in a fresh kernel with its `parameters` cell overridden (SMOKE, RESULTS_DIR, FIGURES_DIR);
executed copies land in --out, the source notebooks stay clean. The kernel draws inline (no MPLBACKEND is
forced on it), so every figure a chapter shows is in its executed copy; the runner counts them per chapter.
Each chapter prints a line before it starts, with the run time its goals cell states ("the notebook runs in
about 3 min on 2 CPU cores"), and one when it ends. No cell timeout that a slow machine can reach: the default
limit (CELL_TIMEOUT, 4 h) only catches a hung kernel. A failing cell stops the series with a message naming the
chapter, the cell and its error, the executed copy (everything up to the failure), and how to continue: the
chapters share their runs through RESULTS_DIR, so running again (all chapters, or `--from NN`) reuses every run
already made instead of training it again. Kernels start with OMP_WAIT_POLICY=PASSIVE (KERNEL_ENV; a value you set
wins): on a machine other jobs share, torch's threads otherwise spin at every barrier while their partner waits for
a core (benchmarks/bench_load.py: a short training 2.2x faster beside two busy loops, 8% slower on an idle machine).
--html renders the executed chapters into a site (one page per chapter,
figures embedded, an index, a syllabus and the reference pages; infusing_kit.teaching.site) that opens without Jupyter.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from .site import math_to_mathml, render_site  # noqa: F401 (the course site; importable from here as before)

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
IMAGE_TYPES = ("image/png", "image/svg+xml", "image/jpeg")
KERNEL_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}  # read by OpenMP when a kernel starts; it changes no arithmetic


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    return paths


def _kernel_config():
    """IPC transport between papermill and its local kernel: no TCP ports, and no "running over TCP without
    encryption" warning from every chapter."""
    from traitlets.config import Config
    c = Config()
    c.KernelManager.transport = "ipc"
    return c


CELL_TIMEOUT = 4 * 3600   # seconds: a hung kernel, not a slow machine (`make run` failed at 1,800 s under load)


def run_notebook(path: Path, out_dir: Path, smoke: bool, results_dir: Path | None = None,
                 figures_dir: Path | None = None, timeout: int | None = CELL_TIMEOUT,
                 parameters: dict | None = None) -> float:
    """Execute one notebook; returns its wall time in seconds. Raises papermill's error on a failing cell.
    parameters: more values for its `parameters` cell (e.g. CONFIG, the study file it runs on). timeout: seconds a
    cell may run (None: no limit); the default only catches a hung kernel, since a busy laptop runs a chapter's
    longest cell (a live search, 10-30 min idle) several times slower and slowness must not become failure."""
    import os

    import papermill as pm
    for k, v in KERNEL_ENV.items():
        os.environ.setdefault(k, v)  # the kernel inherits this process's environment
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"SMOKE": smoke, **(parameters or {})}
    if results_dir is not None:
        params["RESULTS_DIR"] = str(Path(results_dir).resolve())
    if figures_dir is not None:
        params["FIGURES_DIR"] = str(Path(figures_dir).resolve())
    t0 = time.time()
    pm.execute_notebook(str(path), str(out_dir / path.name), parameters=params, kernel_name="python3",
                        cwd=str(path.parent), progress_bar=False, execution_timeout=timeout, config=_kernel_config())
    return time.time() - t0


def expected(path: Path) -> str:
    """The run time a chapter's goals cell states (the parenthesis of its **Time** field), or ''."""
    from .course import layer
    m = re.search(r"\(([^)]*runs[^)]*)\)", layer(path)["time"])
    return m.group(1) if m else ""


def failure(path: Path, executed: Path, error: BaseException, results_dir: str | None) -> str:
    """What to tell the reader when a chapter stops: where, why, and how to continue without losing runs."""
    where = ""
    if getattr(error, "cell_index", None) is not None:
        where = f" at cell {error.cell_index}" + (f" (execution count {error.exec_count})"
                                                   if getattr(error, "exec_count", None) else "")
    why = f"{getattr(error, 'ename', type(error).__name__)}: {getattr(error, 'evalue', error)}".strip()
    why = why.splitlines()[0][:300] if why else type(error).__name__
    runs = results_dir or "runs/notebooks (the chapters' RESULTS_DIR)"
    return (f"{path.name} stopped{where}: {why}\n  executed copy up to the failure: {executed}\n  the runs finished "
            f"so far are kept in {runs}; run the same command again, or add `--from {path.name[:2]}` to start at "
            "this chapter: finished runs are reused, not trained again")


def count_images(executed: Path) -> int:
    """Figures a reader sees in an executed notebook: image outputs of its code cells (widgets' own outputs
    included)."""
    nb = json.loads(Path(executed).read_text())
    n = 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            n += sum(t in out.get("data", {}) for t in IMAGE_TYPES)
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "build" / "notebooks"), help="folder for the executed copies")
    ap.add_argument("--smoke", action="store_true", help="SMOKE=True: tiny settings, as in CI")
    ap.add_argument("--only", nargs="*", help="notebook number prefixes to run, e.g. 02 03")
    ap.add_argument("--from", dest="start", help="start at this chapter number (e.g. 04) and run the ones after it")
    ap.add_argument("--figures", help="FIGURES_DIR for the chapters (default: the notebooks' own, build/figures)")
    ap.add_argument("--results", help="RESULTS_DIR for the chapters (default: the notebooks' own, runs/notebooks)")
    ap.add_argument("--html", help="also render the executed chapters into a static site in this folder")
    args = ap.parse_args(argv)
    paths = notebook_paths(args.only)
    if args.start:
        paths = [p for p in paths if p.name[:2] >= args.start.zfill(2)]
    if not paths:
        print(f"no notebooks matched in {NOTEBOOKS}", file=sys.stderr)
        return 1
    total, executed, seconds_by_name = 0.0, [], {}
    for p in paths:
        hint = "" if args.smoke else expected(p)
        print(f"[{len(executed) + 1}/{len(paths)}] running {p.name} (SMOKE={args.smoke}"
              + (f"; {hint}" if hint else "") + ") ...", flush=True)
        try:
            seconds = run_notebook(p, Path(args.out), args.smoke, results_dir=args.results, figures_dir=args.figures)
        except Exception as e:  # papermill's cell error, a timeout, a dead kernel: say where and how to go on
            print(failure(p, Path(args.out) / p.name, e, args.results), file=sys.stderr, flush=True)
            return 1
        total += seconds
        seconds_by_name[p.name] = seconds
        executed.append(Path(args.out) / p.name)
        print(f"  done in {seconds:.0f} s, {count_images(executed[-1])} figures -> {executed[-1]}", flush=True)
    print(f"{len(paths)} notebooks in {total:.0f} s")
    if args.html:
        index = render_site(executed, Path(args.html), seconds=seconds_by_name)
        size = sum(f.stat().st_size for f in Path(args.html).glob("*.html"))
        print(f"site: {index} ({len(executed)} chapters, {size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
