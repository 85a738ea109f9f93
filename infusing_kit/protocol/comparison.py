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
differs from the comparison's first is refused (`identity.check_identity`). jobs > 1: that many runs at once.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


from ..budget import CACHE, BudgetSpent, deadline_passed, restore_state, save_state, set_deadline  # noqa: F401
from ..checkpoints import FolderBusyError, atomic_write_text
from .calibration import FLAT_FRAC, FLAT_TOL, MARGIN, choose_schedule, flat_length, seed_noise  # noqa: F401
from .experiment import K
from .fingerprint import check, comparison_fingerprint, own_choices
from ..identity import check_identity
from .storage import check_storage
from .study import Protocol, Runner, Study

_P = Protocol()
CALIBRATION_STEPS = _P.calibration_steps  # target steps of the naive learning-rate search (cut down in stage 2)
SEARCH_SEEDS, FINAL_SEEDS, HELDOUT_SEEDS = _P.search_seeds, _P.final_seeds, _P.heldout_seeds  # the built-in study's
HELDOUT, SECOND_SEARCH, CONSTRAINT = _P.heldout, _P.second_search, _P.constraint
SOUP_INGREDIENTS, STOCK_SEED = _P.soup_ingredients, _P.stock_seed


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
    kw = dict(kw)
    runner, method = kw.pop("runner"), kw.pop("preset")
    atomic = kw.pop("atomic", False)  # a run of a group that must finish together (post hoc reads its weights)
    out = Path(kw["out_dir"])
    if not (out / "metrics.json").exists() and not atomic and deadline_passed():
        return None  # --budget: not started (the same command runs it next time)
    while not (out / "metrics.json").exists():
        try:
            runner.run(method, **kw, resume=(out / "run").exists())
        except FolderBusyError:
            time.sleep(poll)
    m = json.loads((out / "metrics.json").read_text())
    m["_dir"] = str(out)
    return m


def run_many(tasks: list[dict], jobs: int, device: str) -> list[dict | None]:
    """run_experiment for each task's keyword arguments, `jobs` at a time, reusing finished runs; None for a run
    the --budget did not let start."""
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
        check_storage(self.storage)  # a bad --storage is refused before any run trains
        fp = own_choices(old_fp := self.chosen.get("fingerprint"), comparison_fingerprint(study), self.chosen,
                         self.protocol.baseline)
        check(old_fp, fp, f"{self.path}", "Resume it with the same model, data and fixed fields, or choose another "
              "--out (and --storage) for a new comparison")
        if old_fp is None and old is not None:
            log(f"{self.path} has no fingerprint (a comparison started before fingerprints were recorded): recorded "
                "this model's, data's and methods' fixed fields; later changes are refused")
        self.chosen["fingerprint"] = {**fp, "methods": {**(old_fp or {}).get("methods", {}), **fp["methods"]}}

    def save(self) -> None:
        atomic_write_text(json.dumps(self.chosen, indent=1), self.path)

    def run(self, tasks: list[dict], what: str) -> list[dict]:
        """Run the tasks (`run_many`); every finished run's identity is checked and its code version recorded.
        Raises BudgetSpent when the --budget stopped some from starting (the finished ones are kept)."""
        done = run_many(tasks, self.jobs, self.device)
        for t, m in zip(tasks, done):
            if m is None:
                continue
            self.chosen["identity"] = check_identity(self.chosen.get("identity"), m, f"{what} {t['out_dir']}")
            self.record_code(m.get("code"))
        self.save()
        if any(m is None for m in done):
            raise BudgetSpent(f"the --budget ran out with {sum(m is None for m in done)} of {len(tasks)} {what}s "
                              "not started")
        return done

    def record_code(self, code) -> None:
        """The code versions that made this comparison's trials and runs (a study may span several; each run and
        trial records its own)."""
        codes = self.chosen.setdefault("codes", [])
        if str(code) not in codes:
            codes.append(str(code))

    def task(self, method: str, seed: int, params: dict, folder: str, test: bool = True, **extra) -> dict:
        return dict(runner=self.runner, preset=method, out_dir=self.runs / folder, seed=seed, device=self.device,
                    progress=False, overrides=params, test=test, registry=self.registry if test else None, **extra)


def compare(out: str | Path, presets: list[str] | None = None, jobs: int = 1, device: str = "cpu",
            smoke: bool = False, trials: dict | None = None, final_seeds=None, heldout_seeds=None, search_seeds=None,
            log=print, stop_after: int | None = None, study: Study | None = None, storage=None,
            budget: float | None = None, state: str | Path | None = None, runner: Runner | None = None) -> dict:
    """Run (or resume) a whole comparison into `out`; returns the choices (chosen.json).

    study: a study (`study.load_study(FILE)`), or the built-in one (`Study.builtin(smoke, presets)`; its protocol's
    seeds and trial budgets may be changed here with trials, final_seeds, heldout_seeds, search_seeds).
    storage: the Optuna storage (default OUT/search.db; a database URL lets several machines join the comparison:
    each runs the same command, the searches share their trials and the runs their folders under OUT).
    stop_after: stop after that stage (the same call later resumes).
    budget: minutes after which no new trial or run starts; the call returns at the next clean boundary with
    chosen["stopped"] set, and the same call resumes. state: a folder (e.g. results/in-progress/NAME, tracked by
    git) that holds the comparison's resumable state between sessions: read into `out` when `out` has none,
    written back when the call returns (`save_state`, `restore_state`). runner: how the built-in study's runs are
    made (default `runners.Builtin(smoke)`; a test gives its own)."""
    from dataclasses import replace
    if study is None:
        p = Study.builtin(smoke).protocol
        changes = {k: tuple(v) for k, v in (("final_seeds", final_seeds), ("heldout_seeds", heldout_seeds),
                                            ("search_seeds", search_seeds)) if v is not None}
        if trials:
            changes["trials"] = tuple(sorted(trials.items()))
        study = Study.builtin(smoke, presets, protocol=replace(p, **changes), runner=runner)
    study.protocol.check(f"study {study.name}:")
    if state is not None and not (Path(out) / "chosen.json").exists() and (Path(state) / "chosen.json").exists():
        restore_state(state, out)
        log(f"resumed from the state in {state}")
    c = Comparison(out, study, jobs, device, storage, log)
    os.environ[CACHE] = str(c.out / "cache")  # values every run of this comparison shares (budget.cached)
    set_deadline(budget)
    try:
        c.chosen.pop("stopped", None)
        return _stages(c, stop_after)
    except BudgetSpent as e:
        c.chosen["stopped"] = str(e)
        c.save()
        log(f"stopped: {e}. Everything finished is kept in {c.out}; run the same command to resume.")
        return c.chosen
    finally:
        set_deadline(None)
        os.environ.pop(CACHE, None)
        if state is not None:
            save_state(c.out, state, storage)
            log(f"state written to {state} (commit it; the same command resumes from it in a fresh checkout)")


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

    # 3-4. the core table first (its searches, then its final runs), then the other methods the same way
    inert = c.chosen["noise"]["kept"][0] if c.chosen["noise"].get("kept") else None
    names = [m for m in study.methods if m != base_name]
    groups = [[m for m in names if m in pr.core], [m for m in names if m not in pr.core]] if pr.core else [names]
    for i, group in enumerate(groups):
        _searches(c, group, base, noise, threshold, inert, kw)
        if stop_after == 3:
            continue
        _finals(c, group, first=i == 0)
    if stop_after == 3:
        return c.chosen

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


def _searches(c: Comparison, names: list[str], base: dict, noise: float, threshold: float, inert, kw: dict) -> None:
    """Stage 3 for some methods: each one's search (and second search), then the ablations' settings."""
    from .search import search
    study, pr = c.study, c.protocol
    constraint = (f"fine_map@{K}", f"generic_map@{K}", threshold)
    studies = [(m, pr.search_seeds[0], m) for m in names if study.methods[m].search] + \
              [(m, 1, f"{m}@search1") for m in pr.second_search if m in names]
    for m, seed, key in studies:
        if key in c.chosen:
            continue
        c.log(f"[3/5] {key}: searching {[f for f, *_ in study.methods[m].search]} on validation (seed {seed})")
        s = search(m, c.storage, c.runs / "search", trials=pr.trials_of(m), seed=seed, base=base, noise=noise,
                   constraint=constraint, inert=inert, **kw)
        for code in s.get("codes", []):
            c.record_code(code)
        cons = s["constraint"]["params"] if s["constraint"] and s["constraint"]["params"] else None
        c.chosen[key] = {"search": s, "params": {**base, **s["params"]},
                         "constraint_params": {**base, **cons} if cons is not None else None}
        c.save()
    _settle_unsearched(c, names, base)


def _settle_unsearched(c: Comparison, names: list[str], base: dict) -> None:
    """Settings of methods with nothing to search: naive's (naive-long: twice its steps), or an ablation's."""
    for m in names:
        pre = c.study.methods[m]
        if m in c.chosen or pre.search:
            continue
        steps_of = 2 * base["steps"] if m == "toy-naive-long" else base["steps"]
        params = {**c.chosen[pre.ablation_of]["params"], **pre.ablation} if pre.ablation_of else {**base,
                                                                                                 "steps": steps_of}
        c.chosen[m] = {"search": None, "params": params, "constraint_params": None}
        c.save()


def _finals(c: Comparison, methods: list[str], first: bool = True) -> None:
    """Stage 4 for some methods. The first group also runs the baseline's final runs, the ingredients of merges and
    every post-hoc row, as one block that finishes once started (post hoc reads those runs' weights, which the
    resumable state does not keep). Then each trained method on its final seeds (`Protocol.seeds_of`), held-out
    seeds, its second search's choice on the held-out seeds, and the constraint rule's choice where it differs
    (on the first `constraint_seeds` final seeds)."""
    ch, pr, M = c.chosen, c.protocol, c.study.methods
    if first:
        _baseline_and_post_hoc(c)
    tasks = []
    for m in [m for m in methods if not M[m].post_hoc]:
        seeds = list(pr.seeds_of(m))
        for s in seeds + (list(pr.heldout_seeds) if m in pr.heldout else []):
            tasks.append(c.task(m, s, ch[m]["params"], f"final/{m}-s{s}"))
        cons = ch[m].get("constraint_params")
        if cons is not None and cons != ch[m]["params"]:
            for s in seeds[:pr.constraint_seeds]:
                tasks.append(c.task(m, s, cons, f"final/{m}-constraint-s{s}", tags={"rule": "constraint"}))
        if f"{m}@search1" in ch:
            for s in pr.heldout_seeds:
                tasks.append(c.task(m, s, ch[f"{m}@search1"]["params"], f"final/{m}-search1-s{s}",
                                    tags={"search_seed": 1}))
    c.log(f"[4/5] final runs: {len(tasks)} trained runs of {len(methods)} methods")
    c.run(tasks, "final run")


def _baseline_and_post_hoc(c: Comparison) -> None:
    ch, pr, M = c.chosen, c.protocol, c.study.methods
    base_name, final_seeds = pr.baseline, list(pr.final_seeds)
    posthoc = [m for m in M if M[m].post_hoc]
    heldout = list(pr.heldout_seeds) if base_name in pr.heldout else []
    wanted = [f"{base_name}-s{s}" for s in final_seeds + heldout] + [f"{m}-s{s}" for m in posthoc for s in final_seeds]
    if all((c.runs / "final" / w / "metrics.json").exists() for w in wanted):
        return
    from ..budget import check_budget
    check_budget("the baseline's final runs and the post-hoc rows")
    naive = ch[base_name]["params"]
    # every post-hoc row runs in this block, the core table's or not: those outside it are settled here (they
    # search nothing; a merge reads naive's runs, whose weights the resumable state does not keep)
    _settle_unsearched(c, posthoc, naive)
    role = {"tags": {"role": "baseline"}, "atomic": True}
    tasks = [c.task(base_name, s, naive, f"final/{base_name}-s{s}", **role)
             for s in final_seeds + heldout]
    if any(M[m].ingredients == "lrs" for m in posthoc) and "soup_ingredients" not in ch:
        ch["soup_ingredients"] = _next_best_lrs(c.storage, ch[base_name]["search"]["study"], pr.soup_ingredients)
    soup_lrs = ch.get("soup_ingredients", [])
    if any(M[m].ingredients == "seeds" for m in posthoc):  # Model Stock's second fine-tuning seed
        tasks += [c.task(base_name, s + pr.stock_seed, naive, f"ingredients/stock-s{s + pr.stock_seed}", test=False,
                         atomic=True) for s in final_seeds]
    if any(M[m].ingredients == "lrs" for m in posthoc):
        tasks += [c.task(base_name, s, {**naive, **lr}, f"ingredients/soup{i}-s{s}", test=False, atomic=True)
                  for s in final_seeds for i, lr in enumerate(soup_lrs)]
    c.log(f"[4/5] {base_name}'s final runs and the ingredients of merges: {len(tasks)} trained runs, then "
          f"{len(posthoc) * len(final_seeds)} post-hoc rows (one block)")
    c.run(tasks, "final run")
    post = []
    for m in posthoc:
        for s in final_seeds:
            merge = {"seeds": [c.runs / "ingredients" / f"stock-s{s + pr.stock_seed}" / "model.pt"],
                     "lrs": [c.runs / "ingredients" / f"soup{i}-s{s}" / "model.pt" for i in range(len(soup_lrs))],
                     None: []}[M[m].ingredients]
            post.append(c.task(m, s, ch[m]["params"], f"final/{m}-s{s}", reuse=c.runs / "final" / f"{base_name}-s{s}",
                               merge_with=tuple(merge), atomic=True))
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
    cfg = open_clip.get_model_config(runner.model_name()) or {}
    layers = cfg.get("vision_cfg", {}).get("layers")
    return int(layers) if isinstance(layers, int) else None
