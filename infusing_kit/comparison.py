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
differs from the comparison's first is refused (`identity.check_identity`). With jobs > 1 that many runs go at
once (each on cpu_count // jobs threads).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .checkpoints import FolderBusyError, atomic_write_text
from .experiment import K, run_experiment
from .identity import check_identity
from .study import Protocol, Runner, Study

_P = Protocol()
CALIBRATION_STEPS = _P.calibration_steps  # target steps of the naive learning-rate search (cut down in stage 2)
FLAT_TOL = 0.03           # fine-grained validation may gain less than this over the last FLAT_FRAC of a schedule
FLAT_FRAC = 0.2
MARGIN = 1.25             # schedule = flat length x MARGIN (held-out seeds may learn a little more slowly)
SEARCH_SEEDS, FINAL_SEEDS, HELDOUT_SEEDS = _P.search_seeds, _P.final_seeds, _P.heldout_seeds  # the built-in study's
HELDOUT, SECOND_SEARCH, CONSTRAINT = _P.heldout, _P.second_search, _P.constraint
SOUP_INGREDIENTS, STOCK_SEED = _P.soup_ingredients, _P.stock_seed


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


def _one(kw: dict, poll: float = 10.0) -> dict:
    """One run, or the finished one in its folder. An interrupted run resumes where its last checkpoint left it. A
    folder another process holds (another machine of the same comparison, on a shared folder) is awaited."""
    import time
    kw = dict(kw)
    runner, method = kw.pop("runner"), kw.pop("preset")
    out = Path(kw["out_dir"])
    while not (out / "metrics.json").exists():
        try:
            if runner.kind == "builtin":  # (module-level run_experiment: tests replace it)
                run_experiment(method, smoke=runner.smoke, **kw, resume=(out / "run").exists())
            else:
                kw.pop("smoke", None)
                runner.run(method, **kw, resume=(out / "run").exists())
        except FolderBusyError:
            time.sleep(poll)
    m = json.loads((out / "metrics.json").read_text())
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


class Comparison:
    """The state of one comparison folder: its study, choices (chosen.json), identity and the runs' tasks."""

    def __init__(self, out: str | Path, study: Study, jobs: int, device: str, storage=None, log=print):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.study, self.runner, self.protocol = study, study.runner, study.protocol
        self.jobs, self.device, self.smoke, self.log = jobs, device, study.runner.smoke, log
        self.storage = storage or self.out / "search.db"
        self.registry, self.runs = self.out / "results.jsonl", self.out / "runs"
        self.path = self.out / "chosen.json"
        self.chosen = json.loads(self.path.read_text()) if self.path.exists() else {}
        now = json.loads(json.dumps(study.describe()))
        old = self.chosen.get("study")
        same = lambda a, b: a["runner"] == b["runner"] and {k: v for k, v in a["protocol"].items() if k != "trials"} \
            == {k: v for k, v in b["protocol"].items() if k != "trials"}
        if old is not None and not same(old, now):
            raise ValueError(f"{self.out} holds a comparison of another study or protocol ({old}); resume it with the "
                             "same study and settings, or choose another --out")
        self.chosen["study"] = {**study.describe(), "methods": sorted(set(self.chosen.get("study", {}).get(
            "methods", [])) | set(study.methods))}

    def save(self) -> None:
        atomic_write_text(json.dumps(self.chosen, indent=1), self.path)

    def run(self, tasks: list[dict], what: str) -> list[dict]:
        done = run_many(tasks, self.jobs, self.device)
        for t, m in zip(tasks, done):
            self.chosen["identity"] = check_identity(self.chosen.get("identity"), m, f"{what} {t['out_dir']}")
        self.save()
        return done

    def task(self, method: str, seed: int, params: dict, folder: str, test: bool = True, **extra) -> dict:
        return dict(runner=self.runner, preset=method, out_dir=self.runs / folder, seed=seed, device=self.device,
                    progress=False, overrides=params, test=test, registry=self.registry if test else None, **extra)


def compare(out: str | Path, presets: list[str] | None = None, jobs: int = 1, device: str = "cpu",
            smoke: bool = False, trials: dict | None = None, final_seeds=None, heldout_seeds=None, search_seeds=None,
            log=print, stop_after: int | None = None, study: Study | None = None, storage=None) -> dict:
    """Run (or resume) a whole comparison into `out`; returns the choices (chosen.json).

    study: a study (`study.load_study(FILE)`), or the built-in one (`Study.builtin(smoke, presets)`; its protocol's
    seeds and trial budgets may be changed here with trials, final_seeds, heldout_seeds, search_seeds).
    storage: the Optuna storage (default OUT/search.db; a database URL lets several machines join the comparison:
    each runs the same command, the searches share their trials and the runs their folders under OUT).
    stop_after: stop after that stage (the same call later resumes)."""
    from dataclasses import replace
    if study is None:
        p = Study.builtin(smoke).protocol
        changes = {k: tuple(v) for k, v in (("final_seeds", final_seeds), ("heldout_seeds", heldout_seeds),
                                            ("search_seeds", search_seeds)) if v is not None}
        if trials:
            changes["trials"] = tuple(sorted(trials.items()))
        study = Study.builtin(smoke, presets, protocol=replace(p, **changes))
    c = Comparison(out, study, jobs, device, storage, log)
    return _stages(c, stop_after)


def _stages(c: Comparison, stop_after: int | None) -> dict:
    from .search import search
    study, pr, log = c.study, c.protocol, c.log
    base_name = pr.baseline
    naive_cfg = c.runner.train_config(base_name)
    budget = pr.calibration_steps
    n_blocks = _n_blocks(c.runner)
    search_seeds = list(pr.search_seeds)
    kw = dict(device=c.device, jobs=c.jobs, n_blocks=n_blocks, runner=c.runner)

    # 1. naive learning rates, on a generous schedule
    if base_name not in c.chosen:
        log(f"[1/5] {base_name}: learning rates on fine-grained validation, {budget} target steps per trial")
        s = search(base_name, c.storage, c.runs / "search", trials=pr.trials_of(base_name), seed=search_seeds[0],
                   base={"steps": budget}, **kw)
        c.chosen[base_name] = {"search": s, "params": dict(s["params"])}
        c.save()
    lrs = {k: v for k, v in c.chosen[base_name]["search"]["params"].items() if k in ("lr_backbone", "lr_head")}
    if stop_after == 1:
        return c.chosen

    # 2. the schedule length at which fine-grained validation is flat for every search seed; the seed noise
    if "schedule" not in c.chosen or "noise" not in c.chosen:
        log(f"[2/5] schedule: {base_name} at the chosen learning rates {lrs}, seeds {search_seeds}, validation only")
        cal = c.run([c.task(base_name, s, {**lrs, "steps": budget}, f"calibration/s{s}", test=False)
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
    c.chosen[base_name]["params"] = base
    c.save()
    noise, threshold = c.chosen["noise"]["noise"], pr.constraint * c.chosen["noise"]["naive_fine"]
    log(f"  schedule: {steps} target steps (flat at {c.chosen['schedule']['flat']} x {MARGIN}); seed noise of the "
        f"mean of validations {noise:.4f}; constraint: fine-grained validation >= {threshold:.4f}")
    if stop_after == 2:
        return c.chosen

    # 3. searches with the same target steps and naive's learning rates as the base; ablations take their base's choice
    constraint = (f"fine_map@{K}", f"generic_map@{K}", threshold)
    names = [m for m in study.methods if m != base_name]
    studies = [(m, search_seeds[0], m) for m in names if study.methods[m].search] + \
              [(m, 1, f"{m}@search1") for m in pr.second_search if m in names]
    for m, seed, key in studies:
        if key in c.chosen:
            continue
        log(f"[3/5] {key}: searching {[f for f, *_ in study.methods[m].search]} on validation (seed {seed})")
        s = search(m, c.storage, c.runs / "search", trials=pr.trials_of(m), seed=seed, base=base, noise=noise,
                   constraint=constraint, **kw)
        cons = s["constraint"]["params"] if s["constraint"] and s["constraint"]["params"] else None
        c.chosen[key] = {"search": s, "params": {**base, **s["params"]},
                         "constraint_params": {**base, **cons} if cons is not None else None}
        c.save()
    for m in names:
        pre = study.methods[m]
        if m in c.chosen or pre.search:
            continue
        steps_of = 2 * steps if m == "toy-naive-long" else steps
        params = {**c.chosen[pre.ablation_of]["params"], **pre.ablation} if pre.ablation_of else {**base,
                                                                                                 "steps": steps_of}
        c.chosen[m] = {"search": None, "params": params, "constraint_params": None}
        c.save()
    if stop_after == 3:
        return c.chosen

    # 4. final runs: test metrics on the final seeds, held-out seeds, post hoc on naive's runs
    _finals(c, [m for m in study.methods if m != base_name], list(pr.final_seeds), list(pr.heldout_seeds))

    # 5. trials and the table
    from .results import load_results, markdown_table, summarise
    from .search import trial_rows
    if not str(c.storage).count("://") or str(c.storage).startswith("sqlite"):
        atomic_write_text("".join(json.dumps(r) + "\n" for r in trial_rows(c.storage)), c.out / "trials.jsonl")
    from .results import label
    # (the comparison's own registry: a study file's rows carry its data's smoke flag, not the runner's)
    rows = [r for r in load_results(c.registry) if r["seed"] in pr.final_seeds and label(r) == r["method"]]
    log("[5/5] " + markdown_table(summarise(rows, baseline=base_name)))
    return c.chosen


def _finals(c: Comparison, methods: list[str], final_seeds: list[int], heldout_seeds: list[int]) -> None:
    ch, pr, M = c.chosen, c.protocol, c.study.methods
    base_name = pr.baseline
    trained = [m for m in [base_name, *methods] if not M[m].post_hoc]
    tasks = []
    for m in trained:
        role = {"tags": {"role": "baseline"}} if m == base_name else {}
        for s in final_seeds + (heldout_seeds if m in pr.heldout else []):
            tasks.append(c.task(m, s, ch[m]["params"], f"final/{m}-s{s}", **role))
        cons = ch[m].get("constraint_params")
        if cons is not None and cons != ch[m]["params"]:
            for s in final_seeds:
                tasks.append(c.task(m, s, cons, f"final/{m}-constraint-s{s}", tags={"rule": "constraint"}))
        if f"{m}@search1" in ch:
            for s in heldout_seeds:
                tasks.append(c.task(m, s, ch[f"{m}@search1"]["params"], f"final/{m}-search1-s{s}",
                                    tags={"search_seed": 1}))
    posthoc = [m for m in methods if M[m].post_hoc]
    naive = ch[base_name]["params"]
    if any(M[m].ingredients == "lrs" for m in posthoc) and "soup_ingredients" not in ch:
        ch["soup_ingredients"] = _next_best_lrs(c.storage, ch[base_name]["search"]["study"], pr.soup_ingredients)
    soup_lrs = ch.get("soup_ingredients", [])
    if any(M[m].ingredients == "seeds" for m in posthoc):  # Model Stock's second fine-tuning seed
        tasks += [c.task(base_name, s + pr.stock_seed, naive, f"ingredients/stock-s{s + pr.stock_seed}", test=False)
                  for s in final_seeds]
    if any(M[m].ingredients == "lrs" for m in posthoc):
        tasks += [c.task(base_name, s, {**naive, **lr}, f"ingredients/soup{i}-s{s}", test=False)
                  for s in final_seeds for i, lr in enumerate(soup_lrs)]
    c.log(f"[4/5] final runs: {len(tasks)} trained runs, then {len(posthoc) * len(final_seeds)} post-hoc rows")
    c.run(tasks, "final run")
    post = []
    for m in posthoc:
        for s in final_seeds:
            merge = {"seeds": [c.runs / "ingredients" / f"stock-s{s + pr.stock_seed}" / "model.pt"],
                     "lrs": [c.runs / "ingredients" / f"soup{i}-s{s}" / "model.pt" for i in range(len(soup_lrs))],
                     None: []}[M[m].ingredients]
            post.append(c.task(m, s, ch[m]["params"], f"final/{m}-s{s}", reuse=c.runs / "final" / f"{base_name}-s{s}",
                               merge_with=tuple(merge)))
    c.run(post, "post-hoc row")


def _next_best_lrs(storage, study_name: str, n: int) -> list[dict]:
    """The learning-rate pairs of the baseline's search trials ranked 2..n+1 by their score (soup ingredients)."""
    import optuna
    from .storage import open_storage
    study = optuna.load_study(study_name=study_name, storage=open_storage(storage))
    done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: -t.value)
    return [{k: t.params[k] for k in ("lr_backbone", "lr_head") if k in t.params} for t in done[1:n + 1]]


def _n_blocks(runner: Runner) -> int | None:
    """The image tower's blocks (freeze_blocks' limit): from the model's open_clip config."""
    import open_clip
    from .experiment import pretrain_config
    name = pretrain_config(0).model if runner.kind == "builtin" else runner_model(runner)
    cfg = open_clip.get_model_config(name) or {}
    layers = cfg.get("vision_cfg", {}).get("layers")
    return int(layers) if isinstance(layers, int) else None


def runner_model(runner: Runner) -> str:
    from .study import load_study
    return load_study(runner.path).config["model"]["name"]
