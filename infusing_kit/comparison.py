"""The whole comparison in one resumable command (docs/method.md, "Protocol"):

  python -m infusing_kit compare --out runs/compare [--presets toy-paper toy-l2sp ...] [--jobs 2] [--device cpu]

Stages; each reuses what an earlier, interrupted call finished (Optuna studies in OUT/search.db, runs with a
metrics.json), so the same command resumes:
1. **naive learning rates**: `toy-naive`'s search (backbone and head learning rate) on fine-grained
   validation, with a generous schedule of CALIBRATION_STEPS target steps;
2. **schedule length**: the chosen learning rates on the search seeds (validation only) give the length T at
   which fine-grained validation has flattened for every seed (`flat_length`), times a margin;
3. **searches**: every other preset's strengths (and, where its search says so, learning rate) with T target
   steps and naive's learning rates as the shared base;
4. **final runs**: each chosen configuration on the final seeds with test evaluation; `toy-naive` and
   `toy-paper` also on held-out seeds that no choice ever saw; `toy-naive-long` (2T target steps, as many
   backbone updates as a round-robin method) shows whether naive simply catches up with more updates;
5. **report**: OUT/results.jsonl (registry), OUT/trials.jsonl (trials, validation only), OUT/chosen.json,
   the table and figures.
With jobs > 1 that many runs go at once (on one GPU, several toy runs share it; on 2 CPU cores, 2 one-thread
runs do 40% more work than one two-thread run).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

from .checkpoints import atomic_write_text
from .experiment import PRESETS, check_identity, run_experiment

CALIBRATION_STEPS = 600   # target steps of the naive learning-rate search (generous: cut down in stage 2)
FLAT_TOL = 0.03           # fine-grained validation may gain less than this over the last FLAT_FRAC of a schedule
FLAT_FRAC = 0.2
MARGIN = 1.25             # schedule = flat length x MARGIN (held-out seeds may learn a little more slowly)
SEARCH_SEEDS = (0, 1, 2)  # seed 0 searches; all three calibrate the schedule (validation only)
FINAL_SEEDS = (0, 1, 2)
HELDOUT_SEEDS = (3, 4)    # never seen by any choice
REQUIRED = ("toy-paper", "toy-l2sp", "toy-ewc", "toy-distill", "toy-wise-ft")


def flat_length(curve: list[tuple[int, float]], tol: float = FLAT_TOL, frac: float = FLAT_FRAC) -> int | None:
    """The shortest schedule T (an evaluated step) at which a validation curve [(step, score), ...] is flat:
    the score gains less than `tol` over the last `frac` of [0, T], and gains less than `tol` after T for the
    rest of the curve (so a plateau before the take-off does not count). None if no step qualifies."""
    curve = sorted(curve)
    steps = [s for s, _ in curve]
    for i, (t, v) in enumerate(curve):
        if t <= 0:
            continue
        before = [s for s in steps if s <= (1 - frac) * t]
        if not before:
            continue
        start = max(before)
        ref = dict(curve)[start]
        window = [x for s, x in curve if start <= s <= t]
        later = [x for _, x in curve[i:]]
        if max(window) - ref < tol and max(later) - v < tol:
            return t
    return None


def choose_schedule(curves: list[list[tuple[int, float]]], eval_every: int, budget: int) -> dict:
    """Schedule length from the calibration curves of several seeds: the longest flat length x MARGIN, rounded up
    to a multiple of eval_every (never above the budget). Returns {"steps", "flat", "margin", "all_flat"}."""
    flats = [flat_length(c) for c in curves]
    if any(f is None for f in flats):
        return {"steps": budget, "flat": flats, "margin": MARGIN, "all_flat": False}
    steps = min(budget, int(math.ceil(max(flats) * MARGIN / eval_every)) * eval_every)
    return {"steps": steps, "flat": flats, "margin": MARGIN, "all_flat": True}


def _curve(metrics: dict, key: str = "val/fine_map@20") -> list[tuple[int, float]]:
    log = Path(metrics["_dir"]) / "run" / "log.jsonl"
    return [(h["target_step"], h[key]) for h in map(json.loads, log.read_text().splitlines()) if key in h]


def _init_worker(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def _one(kw: dict) -> dict:
    out = Path(kw["out_dir"])
    if (out / "metrics.json").exists():  # finished before: reuse
        m = json.loads((out / "metrics.json").read_text())
    else:
        if out.exists() and any(out.iterdir()):  # an interrupted run: start it again from scratch
            import shutil
            shutil.rmtree(out)
        m = run_experiment(**kw)  # appends its registry row
    m["_dir"] = str(out)
    return m


def run_many(tasks: list[dict], jobs: int, device: str) -> list[dict]:
    """run_experiment for each task's keyword arguments, `jobs` at a time, reusing finished runs."""
    if jobs <= 1 or len(tasks) <= 1:
        return [_one(t) for t in tasks]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    threads = max(1, (os.cpu_count() or 1) // jobs) if device == "cpu" else 2
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        return list(pool.map(_one, tasks))


def compare(out: str | Path, presets: list[str] | None = None, jobs: int = 1, device: str = "cpu",
            smoke: bool = False, trials: dict | None = None, final_seeds=FINAL_SEEDS, heldout_seeds=HELDOUT_SEEDS,
            search_seeds=SEARCH_SEEDS, log=print, stop_after: int | None = None) -> dict:
    """Run (or resume) the whole comparison into `out`; returns the chosen configurations.

    presets: the presets to compare besides toy-naive (default: every preset with a search space, and
    toy-wise-ft). trials: {preset: finished trials} to override the search's default count."""
    from .search import search
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage, registry, runs = out / "search.db", out / "results.jsonl", out / "runs"
    presets = list(presets) if presets else [p for p, v in PRESETS.items() if v.search and p != "toy-naive"] + [
        "toy-wise-ft"]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    trials = trials or {}
    chosen_path = out / "chosen.json"
    chosen = json.loads(chosen_path.read_text()) if chosen_path.exists() else {}

    def save():
        atomic_write_text(json.dumps(chosen, indent=1), chosen_path)

    # 1. naive learning rates, on a generous schedule
    naive = PRESETS["toy-naive"]
    budget = CALIBRATION_STEPS if not smoke else naive.smoke_train.steps
    n_blocks = _n_blocks()
    if "toy-naive" not in chosen:
        log(f"[1/5] toy-naive: learning rates on fine-grained validation, {budget} target steps per trial")
        s = search("toy-naive", storage, runs / "search", trials=trials.get("toy-naive"), smoke=smoke,
                   seed=search_seeds[0], device=device, jobs=jobs, base={"steps": budget}, n_blocks=n_blocks)
        chosen["toy-naive"] = {"search": s, "params": dict(s["params"])}
        save()
    lrs = chosen["toy-naive"]["params"]

    # 2. the schedule length at which fine-grained validation is flat for every search seed
    if "schedule" not in chosen:
        log(f"[2/5] schedule: toy-naive at the chosen learning rates {lrs}, seeds {list(search_seeds)}, validation only")
        cal = run_many([dict(preset="toy-naive", out_dir=runs / "calibration" / f"s{s}", smoke=smoke, seed=s,
                             device=device, progress=False, overrides={**lrs, "steps": budget}, test=False)
                        for s in search_seeds], jobs, device)
        for s, m in zip(search_seeds, cal):
            chosen["identity"] = check_identity(chosen.get("identity"), m, f"calibration run of seed {s}")
        eval_every = (naive.smoke_train if smoke else naive.train).eval_every
        sched = choose_schedule([_curve(m) for m in cal], eval_every, budget)
        sched["curves"] = {str(s): _curve(m) for s, m in zip(search_seeds, cal)}
        chosen["schedule"] = sched
        save()
        if not sched["all_flat"]:
            log(f"  WARNING: fine-grained validation is not flat within {budget} steps for every seed "
                f"({sched['flat']}); using the whole budget")
    steps = chosen["schedule"]["steps"]
    base = {**lrs, "steps": steps}
    chosen["toy-naive"]["params"] = base
    save()
    log(f"  schedule: {steps} target steps (flat at {chosen['schedule']['flat']} x {MARGIN})")
    if stop_after == 2:
        return chosen

    # 3. every other preset's search with the same target steps and naive's learning rates as the base
    for p in presets:
        if p in chosen:
            continue
        if not PRESETS[p].search:
            chosen[p] = {"search": None, "params": dict(base)}
            save()
            continue
        log(f"[3/5] {p}: searching {[f for f, *_ in PRESETS[p].search]} on validation")
        s = search(p, storage, runs / "search", trials=trials.get(p), smoke=smoke, seed=search_seeds[0],
                   device=device, jobs=jobs, base=base, n_blocks=n_blocks)
        chosen[p] = {"search": s, "params": {**base, **s["params"]}}
        save()
    chosen["toy-naive-long"] = {"search": None, "params": {**base, "steps": 2 * steps}}
    save()

    # 4. final runs: test metrics, search seeds and held-out seeds
    tasks = []
    for p in ["toy-naive", "toy-naive-long", *presets]:
        seeds = list(final_seeds) + (list(heldout_seeds) if p in ("toy-naive", "toy-paper") else [])
        for s in seeds:
            tasks.append(dict(preset=p, out_dir=runs / "final" / f"{p}-s{s}", smoke=smoke, seed=s, device=device,
                              progress=False, overrides=chosen[p]["params"], registry=registry))
    log(f"[4/5] final runs: {len(tasks)} runs with test evaluation")
    run_many(tasks, jobs, device)

    # 5. trials and the table
    from .results import load_results, markdown_table, summarise
    from .search import trial_rows
    atomic_write_text("".join(json.dumps(r) + "\n" for r in trial_rows(storage)), out / "trials.jsonl")
    rows = load_results(registry, smoke=smoke)
    log("[5/5] " + markdown_table(summarise([r for r in rows if r["seed"] in final_seeds])))
    return chosen


def _n_blocks() -> int:
    from .models import CONFIG_DIR
    from .experiment import pretrain_config
    cfg = json.loads((CONFIG_DIR / f"{pretrain_config(0).model}.json").read_text())
    return int(cfg["vision_cfg"]["layers"])


def apply(chosen: dict, preset: str):
    """The TrainConfig a preset gets from a comparison's chosen.json (what its final runs used)."""
    p = PRESETS[preset]
    return replace(p.train, **chosen[preset]["params"])
