"""Hyper-parameter search on validation only (docs/method.md, "Protocol"), with Optuna.

  python -m infusing_kit search --preset toy-paper --storage runs/search.db [--trials N] [--jobs 2] [--final-seeds 0 1 2]

A study explores before it exploits, never stops silently at the edge of its range, and spends a fixed budget of
finished trials (`study_budget`: 12 for one searched field, 20 for two), every phase included:
1. **Space-filling start.** The first 6 x d trials (d = number of searched fields) are a Latin hypercube over
   the whole range (log scale where the range is), seeded per study: every one-dimensional projection has one
   point in each of 6 x d equal slices, so no part of a range goes untried.
2. **Model-based refinement.** Then Optuna's TPE sampler (its own seed per study) proposes more, up to the budget
   less a reserve (3 points for one field, 2 for two). These trials report their running best validation score
   at every validation, and a median pruner stops those that trail the median of earlier trials at the same step
   (multi-fidelity: the budget buys more points). Start-up trials are never pruned.
3. **Edges extend the range.** When the best value of a field lies in the outer 5% of a log range (15% of a
   linear one), no tried value beyond it scores more than twice the seed noise below the best, and the score is
   still rising there (the best beats every tried value in the next quarter of the range inward by more than the
   noise), the range grows on that side (by half its width, log units where the range is log) up to the field's
   hard limit, and space-filling points in the new strip (up to 4, from the reserve) explore it; at most 3 times.
   (What the reserve does not need goes to TPE at the end.)
   A choice still at an edge is reported in the result (`at_edge`), never silent.
4. **Transitions get what is left of the budget** (one-field searches, given the seed noise of the score): the
   midpoint between two neighbouring tried values whose scores differ by more than twice the noise goes where a
   selection rule decides: first beside the best (the edge of its plateau), then where fine-grained validation
   crosses the constraint rule's threshold; gaps on the collapsed side of a range get none.
5. **Flat studies say so.** When every finished trial scores within twice the seed noise of the best, the study
   is `flat`; when the best scores within twice the noise of the range's inert end (`inert`: the baseline's own
   validation score, what the method gives at strength 0), it has `no_gain`: no setting of its range beats
   the baseline beyond what another fine-tuning seed would, and the report says that instead of crowning a point.
Two selection rules read the same trials: the mean of the validations (the study's objective) and a constraint
rule (`constrained_choice`: the best generic validation among trials whose fine-grained validation reaches a stated
fraction of naive's).

Each trial runs the preset with the sampled values and returns the validation score of its kept checkpoint
(the preset's selection key: the mean of fine-grained and generic validation mAP@20 for regularized methods,
fine-grained validation for naive fine-tuning). Test sets are never evaluated in a trial. Trials store their
whole TrainConfig. The study lives in its storage (`storage.open_storage`): an SQLite file on one machine, or a database URL
(postgresql://...) that workers on many machines share. An interrupted search resumes where it stopped (finished
trials are kept; on SQLite a start-up point that was running when the process died is queued again; on a shared
database a dead worker's trial is failed and queued again once its heartbeat is GRACE seconds old, and a joining
machine never touches its peers' live trials). With jobs > 1, that many worker processes share the study on this
machine; under torchrun one data-parallel worker trains each trial on all its processes.
`final_runs` then runs the chosen configuration once per seed with test evaluation.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..budget import BudgetSpent, deadline_passed
from .choices import summary  # noqa: F401 (search.summary)
from .spaces import (MAX_EXTENSIONS, _reserve, extend_space, hard_limits, startup_count,  # noqa: F401
                     startup_points, study_budget, transition_points)
from .storage import fail_dead_trials, open_storage, open_study, study_lock, study_seed, trial_rows  # noqa: F401
from .runners import Builtin, Runner
from .trials import _follow, _run_workers, _sqlite, wait_for_trials

# The seed of every study's start-up design (the space-filling points in the unit cube, scaled to its space). Since
# the first comparison it has been this one key, not the study's own (a loop variable named `key` took the last
# attribute's name): studies of one dimension start from the same unit-cube points, which is fair across methods.
# Kept so that every registry's studies re-run to the same points; TPE's seed is the study's own (`open_study`).
DESIGN_KEY = "extensions"


# ---------------------------------------------------------------------------- the study
def _space_of(runner: Runner, method: str, cfg) -> list[tuple]:
    """The method's search ranges, each inside its field's hard limits (e.g. lp_ft_steps below the schedule)."""
    out = []
    for f, lo, hi, log in runner.method(method).search:
        hard_lo, hard_hi = hard_limits(f, cfg.steps, None)
        out.append((f, lo if hard_lo is None else max(lo, hard_lo), hi if hard_hi is None else min(hi, hard_hi), log))
    return out


def _prepare(method: str, storage, runner: Runner, seed: int, base: dict) -> tuple:
    """Open (or create) the study, check it is this method's on this runner and schedule, queue its start-up
    design once, and (a SQLite file: one machine) re-queue start-up points that a killed process left running. On
    a shared database running trials belong to other machines; dead ones are retried through their heartbeats."""
    import optuna
    m = runner.method(method)
    if not m.search:
        raise ValueError(f"method {method!r} has no search space (it has no strength to choose)")
    name, key = runner.study_name(method, seed), runner.seed_key(method, seed)
    cfg = replace(runner.train_config(method), **base)
    space = _space_of(runner, method, cfg)
    n_startup = startup_count(len(space))
    store = open_storage(storage)
    study = open_study(name, store, n_startup, prune_warmup=max(1, int(0.4 * cfg.steps)), key=key)
    with study_lock(store, name):  # one machine sets a new study up; the others then find it set up
        _set_up(study, runner, method, seed, base, storage, space, n_startup, key)
    if _sqlite(storage):  # a dead worker's trial fails (its design point queued again); a live one runs on
        fail_dead_trials(study)
    return study, cfg


def _set_up(study, runner: Runner, method: str, seed: int, base: dict, storage, space: list, n_startup: int,
            key: str) -> None:
    name = study.study_name
    attrs = study.user_attrs
    if "base" in attrs and attrs["base"] != base:
        raise ValueError(f"study {name} in {storage} was run with base settings {attrs['base']}, not {base}; use "
                         "another --storage (a study's trials must share one schedule)")
    import json
    if "runner" in attrs and attrs["runner"] != json.loads(json.dumps(runner.describe())):
        raise ValueError(f"study {name} in {storage} belongs to {attrs['runner']}, not {runner.describe()}; use "
                         "another --storage")
    from .fingerprint import check_study
    check_study(study, runner, method, base, storage)  # the same model, data and fixed fields, or a clear refusal
    if "space" not in attrs:
        for attr, value in (("method", method), ("seed", seed), ("runner", runner.describe()), ("base", base),
                            ("space", [list(s) for s in space]), ("extensions", [])):
            study.set_user_attr(attr, value)
        for params in startup_points(space, n_startup, study_seed(DESIGN_KEY)):
            study.enqueue_trial(params, user_attrs={"design": "startup"})


def search(method: str, storage: str | Path, out_root: str | Path, trials: int | None = None, smoke: bool = False,
           seed: int = 0, device: str = "cpu", jobs: int = 1, base: dict | None = None, n_blocks: int | None = None,
           extend: bool = True, noise: float = 0.0, constraint: tuple | None = None,
           runner: Runner | None = None, inert: float | None = None) -> dict:
    """Explore, refine, extend (where the best value sits at an edge) and map transitions; returns the choice.

    method: a preset on the built-in world (runner None: `runners.Builtin(smoke)`), or a method of the study file
    of `runner`. storage: a SQLite file, or a database URL that several machines share (they join the same
    study; each returns once every trial has finished). trials: finished (complete or pruned) trials before the
    whole study, extension and transition points included (default `study_budget(d)`). base: TrainConfig fields every trial shares (e.g. the schedule
    and learning rates chosen for naive). noise: the seed noise of the objective (the spread of one configuration
    over fine-tuning seeds): with it, transitions get points and a flat study is reported as such. constraint:
    (fine key, generic key, threshold) for the constraint rule. inert: the baseline's score on the study's
    selection key (the range's inert end), for `no_gain`. A --budget deadline (`budget.set_deadline`) stops it
    between trials with `BudgetSpent`; the same call resumes. Returns {"method", "params", "value", "trials",
    "distinct", "val", "space", "extensions", "at_edge", "flat", "spread", "constraint"}."""
    from .. import distributed
    runner = runner or Builtin(smoke)
    base = dict(base or {})
    if distributed.active():
        if jobs > 1:
            raise ValueError("under torchrun each trial is data-parallel: use --jobs 1")
        if not distributed.is_main():  # follow rank 0's trials, phase after phase, until it has the summary
            while (msg := _follow(runner, method, seed, device, base))[0] != "finished":
                pass
            return msg[1]
        try:
            result = _search(method, storage, out_root, trials, seed, device, jobs, base, n_blocks, extend, noise,
                             constraint, runner, inert)
        except BaseException:
            distributed.broadcast_object(("finished", None))
            raise
        distributed.broadcast_object(("finished", result))
        return result
    return _search(method, storage, out_root, trials, seed, device, jobs, base, n_blocks, extend, noise, constraint,
                   runner, inert)


def _search(method, storage, out_root, trials, seed, device, jobs, base, n_blocks, extend, noise, constraint, runner,
            inert=None):
    import optuna
    study, cfg = _prepare(method, storage, runner, seed, base)
    d = len(runner.method(method).search)
    total = trials if trials is not None else study_budget(d)
    if total < startup_count(d):
        raise ValueError(f"trials={total} is below the {startup_count(d)} space-filling start-up points of a "
                         f"{d}-field search")
    space = [tuple(s) for s in study.user_attrs["space"]]
    states = lambda *s: len(study.get_trials(deepcopy=False, states=s))
    T = optuna.trial.TrialState
    # points a killed session had queued (start-up, an edge extension, a transition) run before anything is decided
    queued, finished = states(T.WAITING), states(T.COMPLETE, T.PRUNED)
    args = lambda sp, n: (runner, method, str(storage), str(out_root), seed, device, base, sp, n)

    def run_to(sp, n):
        _run_workers(args(sp, n), jobs, device)
        wait_for_trials(study.study_name, storage, args(sp, n), jobs, device)
        if deadline_passed():
            raise BudgetSpent(f"the --budget ran out during study {study.study_name} (its finished trials are kept)")

    run_to(space, max(total - _reserve(d, total), finished + queued))
    store = open_storage(storage)
    made = study.user_attrs.get("decisions", 0)  # extensions and transition rounds queued so far, by any machine

    def decide_once(decide) -> bool:
        """Make one decision (queue an extension's or a transition round's points) once across the machines that
        share the study, on a settled study (nothing waiting or running), then run what it queued. Under the lock
        a machine that finds the decision made by another runs its points instead. False: nothing to decide."""
        nonlocal study, made
        while True:
            with study_lock(store, study.study_name):
                study = optuna.load_study(study_name=study.study_name, storage=store)
                now = study.user_attrs.get("decisions", 0)
                if now > made:  # another machine made this decision while this one ran or waited
                    made, settled = now, True
                elif states(T.WAITING, T.RUNNING):  # trials of another machine: run them, then decide
                    settled = False
                else:
                    if decide(study) is None:
                        return False
                    made += 1
                    study.set_user_attr("decisions", made)
                    settled = True
                target = states(T.COMPLETE, T.PRUNED, T.WAITING, T.RUNNING)
            run_to([tuple(s) for s in study.user_attrs["space"]], target)
            if settled:
                return True

    def extension(study) -> int | None:
        finished = [t for t in study.trials if t.state == T.COMPLETE]
        space = [tuple(s) for s in study.user_attrs["space"]]
        n_now = states(T.COMPLETE, T.PRUNED)
        history = study.user_attrs.get("extensions", [])
        if n_now >= total or len(history) >= MAX_EXTENSIONS:
            return None
        new, grown, stuck = extend_space(space, [t.params for t in finished], study.best_trial.params, cfg.steps,
                                         n_blocks, [t.value for t in finished], noise)
        if not grown:
            return None
        study.set_user_attr("space", [list(s) for s in new])
        study.set_user_attr("extensions", history + [grown])
        per_strip = max(1, min(4, (total - n_now) // len(grown)))
        n_new = 0
        for f, lo, hi, log in new:  # space-filling points in each new strip, the other fields at the best values
            old = next(s for s in space if s[0] == f)
            if (lo, hi) == tuple(old[1:3]):
                continue
            strip = (lo, old[1], log) if lo < old[1] else (old[2], hi, log)
            for u in startup_points([(f, *strip)], per_strip,
                                    study_seed(runner.seed_key(method, seed)) + len(study.trials)):
                study.enqueue_trial({**study.best_trial.params, **u}, user_attrs={"design": "extension"})
                n_new += 1
        return n_new

    def transition(study) -> int | None:  # points where a selection rule decides (one-field studies)
        left = total - states(T.COMPLETE, T.PRUNED)
        if left <= 0:
            return None
        space = [tuple(s) for s in study.user_attrs["space"]]
        done = [(t.params, t.value, t.user_attrs.get(constraint[0]) if constraint else None)
                for t in study.trials if t.state == T.COMPLETE]
        queued = {tuple(sorted(t.params.items())) for t in study.trials if t.state == T.WAITING}
        points = [p for p in transition_points(space, done, noise, max_points=left,
                                               threshold=constraint[2] if constraint else None)
                  if tuple(sorted(p.items())) not in queued]
        if not points:
            return None
        for p in points:
            study.enqueue_trial(p, user_attrs={"design": "transition"})
        return len(points)

    while extend and decide_once(extension):
        pass
    for _ in range(2 if noise > 0 else 0):
        if not decide_once(transition):
            break
    study = optuna.load_study(study_name=study.study_name, storage=open_storage(storage))
    if states(T.COMPLETE, T.PRUNED) < total:  # what no extension or transition needed goes to TPE
        run_to([tuple(s) for s in study.user_attrs["space"]], total)
    return summary(study.study_name, storage, n_blocks=n_blocks, steps=cfg.steps, noise=noise, constraint=constraint,
                   inert=inert)


def final_runs(method: str, params: dict, seeds: list[int], out_root: str | Path, registry: str | Path,
               smoke: bool = False, device: str = "cpu", progress: bool = False, runner: Runner | None = None) -> list[dict]:
    """The chosen configuration, once per seed, with test evaluation; one registry row each."""
    runner = runner or Builtin(smoke)
    return [runner.run(method, Path(out_root) / f"{method}{'-smoke' if runner.smoke else ''}-s{s}", seed=s,
                       overrides=params, registry=registry, device=device, progress=progress) for s in seeds]
