"""The whole comparison in one resumable command (docs/method.md, "Protocol"):

  python -m infusing_kit compare --out runs/compare [--presets toy-paper toy-l2sp ...] [--jobs 2] [--device cpu]

Stages; each reuses what an earlier, interrupted call finished (Optuna studies in OUT/search.db, runs with a
metrics.json, choices in OUT/chosen.json), so the same command resumes:
1. **naive learning rates**: `toy-naive`'s search (backbone and head learning rate) on fine-grained
   validation, with a generous schedule of CALIBRATION_STEPS target steps;
2. **schedule length and seed noise**: the chosen learning rates on the search seeds (validation only) give the
   length T at which fine-grained validation has flattened for every seed (`flat_length`), times a margin; the
   same runs give the seed noise of the selection score (its spread over fine-tuning seeds at T) and naive's
   fine-grained validation, the reference of the constraint rule;
3. **searches**: every preset with a search space, on seed 0, with T target steps and naive's learning rates as
   the shared base (a preset whose search names a learning rate searches it). Two rules choose from the same
   trials: the mean of the validations (the objective) and the constraint rule (the best generic validation
   among trials reaching CONSTRAINT x naive's fine-grained validation). SECOND_SEARCH presets are searched again
   on seed 1 (do the choices survive?). Ablations take their base preset's choice (`Preset.ablation_of`);
4. **final runs** with test evaluation: every preset on FINAL_SEEDS (the mean-rule choice; the constraint-rule
   choice too where it differs), HELDOUT presets also on HELDOUT_SEEDS that no choice ever saw, the second search
   seed's choices on HELDOUT_SEEDS; post-hoc presets merge naive's final runs (no training of their own): WiSE-FT
   and LiNeS on the run of the same seed, Model Stock with a second fine-tuning seed, soups with naive runs at the
   search's next-best learning rates;
5. **report**: OUT/results.jsonl (registry), OUT/trials.jsonl (trials, validation only), OUT/chosen.json, the table.
Every run records the fingerprint of its starting weights, its thread count, device and torch version; a run that
differs from the comparison's first is refused (`experiment.check_identity`). With jobs > 1 that many runs go at
once (each on cpu_count // jobs threads).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .checkpoints import atomic_write_text
from .experiment import K, PRESETS, check_identity, run_experiment

CALIBRATION_STEPS = 600   # target steps of the naive learning-rate search (generous: cut down in stage 2)
FLAT_TOL = 0.03           # fine-grained validation may gain less than this over the last FLAT_FRAC of a schedule
FLAT_FRAC = 0.2
MARGIN = 1.25             # schedule = flat length x MARGIN (held-out seeds may learn a little more slowly)
SEARCH_SEEDS = (0, 1, 2)  # seed 0 searches; all three calibrate the schedule and the noise (validation only)
FINAL_SEEDS = (0, 1, 2, 3, 4)
HELDOUT_SEEDS = (5, 6, 7)  # never seen by any choice
HELDOUT = ("toy-naive", "toy-paper", "toy-distill", "toy-l2sp", "toy-ewc")
SECOND_SEARCH = ("toy-paper", "toy-distill")
CONSTRAINT = 0.95          # constraint rule: fine-grained validation >= 0.95 x naive's
SOUP_INGREDIENTS = 3       # naive runs at the search's next-best learning rates, besides naive's own
STOCK_SEED = 1000          # Model Stock's second fine-tuning seed: seed + 1000


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


def seed_noise(logs: list[list[dict]], steps: int, select: str = f"mean_map@{K}") -> dict:
    """From naive's calibration logs (one per seed): at the schedule length, the score a run keeps by `select`
    (the best validation up to `steps`), per seed, its standard deviation over seeds (the seed noise of a
    study's objective), and naive's mean fine-grained validation at its kept checkpoint (by fine validation)."""
    kept, fine = [], []
    for log in logs:
        vals = [h for h in log if f"val/{select}" in h and 0 < h["target_step"] <= steps]
        kept.append(max(h[f"val/{select}"] for h in vals))
        fine.append(max(h[f"val/fine_map@{K}"] for h in vals))
    return {"kept": kept, "noise": float(np.std(kept, ddof=1)) if len(kept) > 1 else 0.0,
            "naive_fine": float(np.mean(fine))}


def _log(metrics: dict) -> list[dict]:
    path = Path(metrics["_dir"]) / "run" / "log.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()]


def _curve(metrics: dict, key: str = f"val/fine_map@{K}") -> list[tuple[int, float]]:
    return [(h["target_step"], h[key]) for h in _log(metrics) if key in h]


def _init_worker(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


def _one(kw: dict) -> dict:
    """One run, or the finished one in its folder. An interrupted run resumes where its last checkpoint left it."""
    out = Path(kw["out_dir"])
    if (out / "metrics.json").exists():  # finished before: reuse
        m = json.loads((out / "metrics.json").read_text())
    else:
        m = run_experiment(**kw, resume=(out / "run").exists())  # appends its registry row
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


def default_presets() -> list[str]:
    """Every preset but toy-naive and toy-naive-long (which the comparison always runs)."""
    return [p for p in PRESETS if p not in ("toy-naive", "toy-naive-long")]


class Comparison:
    """The state of one comparison folder: its choices (chosen.json), identity and the runs' tasks."""

    def __init__(self, out: str | Path, jobs: int, device: str, smoke: bool, log=print):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jobs, self.device, self.smoke, self.log = jobs, device, smoke, log
        self.storage, self.registry, self.runs = self.out / "search.db", self.out / "results.jsonl", self.out / "runs"
        self.path = self.out / "chosen.json"
        self.chosen = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self) -> None:
        atomic_write_text(json.dumps(self.chosen, indent=1), self.path)

    def run(self, tasks: list[dict], what: str) -> list[dict]:
        done = run_many(tasks, self.jobs, self.device)
        for t, m in zip(tasks, done):
            self.chosen["identity"] = check_identity(self.chosen.get("identity"), m, f"{what} {t['out_dir']}")
        self.save()
        return done

    def task(self, preset: str, seed: int, params: dict, folder: str, test: bool = True, **extra) -> dict:
        return dict(preset=preset, out_dir=self.runs / folder, smoke=self.smoke, seed=seed, device=self.device,
                    progress=False, overrides=params, test=test, registry=self.registry if test else None, **extra)


def compare(out: str | Path, presets: list[str] | None = None, jobs: int = 1, device: str = "cpu",
            smoke: bool = False, trials: dict | None = None, final_seeds=FINAL_SEEDS, heldout_seeds=HELDOUT_SEEDS,
            search_seeds=SEARCH_SEEDS, log=print, stop_after: int | None = None) -> dict:
    """Run (or resume) the whole comparison into `out`; returns the choices (chosen.json).

    presets: the presets to compare besides toy-naive (default: all). trials: {preset: finished trials} to
    override the search's default count. stop_after: stop after that stage (the same call later resumes)."""
    from .search import search
    c = Comparison(out, jobs, device, smoke, log)
    presets = list(presets) if presets is not None else default_presets()
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise ValueError(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
    trials = trials or {}
    naive = PRESETS["toy-naive"]
    naive_cfg = naive.smoke_train if smoke else naive.train
    budget = CALIBRATION_STEPS if not smoke else naive.smoke_train.steps
    n_blocks = _n_blocks()

    # 1. naive learning rates, on a generous schedule
    if "toy-naive" not in c.chosen:
        log(f"[1/5] toy-naive: learning rates on fine-grained validation, {budget} target steps per trial")
        s = search("toy-naive", c.storage, c.runs / "search", trials=trials.get("toy-naive"), smoke=smoke,
                   seed=search_seeds[0], device=device, jobs=jobs, base={"steps": budget}, n_blocks=n_blocks)
        c.chosen["toy-naive"] = {"search": s, "params": dict(s["params"])}
        c.save()
    lrs = {k: c.chosen["toy-naive"]["search"]["params"][k] for k in ("lr_backbone", "lr_head")}
    if stop_after == 1:
        return c.chosen

    # 2. the schedule length at which fine-grained validation is flat for every search seed; the seed noise
    if "schedule" not in c.chosen or "noise" not in c.chosen:
        log(f"[2/5] schedule: toy-naive at the chosen learning rates {lrs}, seeds {list(search_seeds)}, validation only")
        cal = c.run([c.task("toy-naive", s, {**lrs, "steps": budget}, f"calibration/s{s}", test=False)
                     for s in search_seeds], "calibration run")
        if "schedule" not in c.chosen:
            sched = choose_schedule([_curve(m) for m in cal], naive_cfg.eval_every, budget)
            sched["curves"] = {str(s): _curve(m) for s, m in zip(search_seeds, cal)}
            c.chosen["schedule"] = sched
            if not sched["all_flat"]:
                log(f"  WARNING: fine-grained validation is not flat within {budget} steps for every seed "
                    f"({sched['flat']}); using the whole budget")
        c.chosen["noise"] = seed_noise([_log(m) for m in cal], c.chosen["schedule"]["steps"])
        c.save()
    steps = c.chosen["schedule"]["steps"]
    base = {**lrs, "steps": steps}
    c.chosen["toy-naive"]["params"] = base
    c.save()
    noise, threshold = c.chosen["noise"]["noise"], CONSTRAINT * c.chosen["noise"]["naive_fine"]
    log(f"  schedule: {steps} target steps (flat at {c.chosen['schedule']['flat']} x {MARGIN}); seed noise of the "
        f"mean of validations {noise:.4f}; constraint: fine-grained validation >= {threshold:.4f}")
    if stop_after == 2:
        return c.chosen

    # 3. searches with the same target steps and naive's learning rates as the base; ablations take their base's choice
    constraint = (f"fine_map@{K}", f"generic_map@{K}", threshold)
    studies = [(p, search_seeds[0], p) for p in presets if PRESETS[p].search] + \
              [(p, 1, f"{p}@search1") for p in SECOND_SEARCH if p in presets]
    for p, seed, key in studies:
        if key in c.chosen:
            continue
        log(f"[3/5] {key}: searching {[f for f, *_ in PRESETS[p].search]} on validation (seed {seed})")
        s = search(p, c.storage, c.runs / "search", trials=trials.get(p), smoke=smoke, seed=seed, device=device,
                   jobs=jobs, base=base, n_blocks=n_blocks, noise=noise, constraint=constraint)
        cons = s["constraint"]["params"] if s["constraint"] and s["constraint"]["params"] else None
        c.chosen[key] = {"search": s, "params": {**base, **s["params"]},
                         "constraint_params": {**base, **cons} if cons is not None else None}
        c.save()
    for p in presets:
        pre = PRESETS[p]
        if p in c.chosen or pre.search:
            continue
        params = {**c.chosen[pre.ablation_of]["params"], **pre.ablation} if pre.ablation_of else dict(base)
        c.chosen[p] = {"search": None, "params": params, "constraint_params": None}
        c.save()
    c.chosen["toy-naive-long"] = {"search": None, "params": {**base, "steps": 2 * steps}, "constraint_params": None}
    c.save()
    if stop_after == 3:
        return c.chosen

    # 4. final runs: test metrics on the final seeds, held-out seeds, post hoc on naive's runs
    _finals(c, presets, list(final_seeds), list(heldout_seeds))

    # 5. trials and the table
    from .results import load_results, markdown_table, summarise
    from .search import trial_rows
    atomic_write_text("".join(json.dumps(r) + "\n" for r in trial_rows(c.storage)), c.out / "trials.jsonl")
    rows = [r for r in load_results(c.registry, smoke=smoke) if r["seed"] in final_seeds and not r.get("tags")]
    log("[5/5] " + markdown_table(summarise(rows)))
    return c.chosen


def _finals(c: Comparison, presets: list[str], final_seeds: list[int], heldout_seeds: list[int]) -> None:
    ch = c.chosen
    trained = [p for p in ["toy-naive", "toy-naive-long", *presets] if not PRESETS[p].post_hoc]
    tasks = []
    for p in trained:
        for s in final_seeds + (heldout_seeds if p in HELDOUT else []):
            tasks.append(c.task(p, s, ch[p]["params"], f"final/{p}-s{s}"))
        cons = ch[p].get("constraint_params")
        if cons is not None and cons != ch[p]["params"]:
            for s in final_seeds:
                tasks.append(c.task(p, s, cons, f"final/{p}-constraint-s{s}", tags={"rule": "constraint"}))
        if f"{p}@search1" in ch:
            for s in heldout_seeds:
                tasks.append(c.task(p, s, ch[f"{p}@search1"]["params"], f"final/{p}-search1-s{s}",
                                    tags={"search_seed": 1}))
    posthoc = [p for p in presets if PRESETS[p].post_hoc]
    naive = ch["toy-naive"]["params"]
    soup_lrs = _next_best_lrs(c.storage, ch, SOUP_INGREDIENTS)
    ch["soup_ingredients"] = soup_lrs
    if any(PRESETS[p].ingredients == "seeds" for p in posthoc):  # Model Stock's second fine-tuning seed
        tasks += [c.task("toy-naive", s + STOCK_SEED, naive, f"ingredients/stock-s{s + STOCK_SEED}", test=False)
                  for s in final_seeds]
    if any(PRESETS[p].ingredients == "lrs" for p in posthoc):
        tasks += [c.task("toy-naive", s, {**naive, **lr}, f"ingredients/soup{i}-s{s}", test=False)
                  for s in final_seeds for i, lr in enumerate(soup_lrs)]
    c.log(f"[4/5] final runs: {len(tasks)} trained runs, then {len(posthoc) * len(final_seeds)} post-hoc rows")
    c.run(tasks, "final run")
    post = []
    for p in posthoc:
        for s in final_seeds:
            merge = {"seeds": [c.runs / "ingredients" / f"stock-s{s + STOCK_SEED}" / "model.pt"],
                     "lrs": [c.runs / "ingredients" / f"soup{i}-s{s}" / "model.pt" for i in range(len(soup_lrs))],
                     None: []}[PRESETS[p].ingredients]
            post.append(c.task(p, s, ch[p]["params"], f"final/{p}-s{s}", reuse=c.runs / "final" / f"toy-naive-s{s}",
                               merge_with=tuple(merge)))
    c.run(post, "post-hoc row")


def _next_best_lrs(storage: Path, chosen: dict, n: int) -> list[dict]:
    """The learning-rate pairs of naive's search trials ranked 2..n+1 by fine-grained validation (soup ingredients)."""
    import optuna
    from .search import _storage
    study = optuna.load_study(study_name=chosen["toy-naive"]["search"]["study"], storage=_storage(storage))
    done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: -t.value)
    return [{k: t.params[k] for k in ("lr_backbone", "lr_head")} for t in done[1:n + 1]]


def _n_blocks() -> int:
    from .models import CONFIG_DIR
    from .experiment import pretrain_config
    cfg = json.loads((CONFIG_DIR / f"{pretrain_config(0).model}.json").read_text())
    return int(cfg["vision_cfg"]["layers"])
