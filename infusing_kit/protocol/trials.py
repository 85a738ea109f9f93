"""Running a study's trials: the objective (one run of the method with the trial's values, reporting its running
best for pruning), the worker processes that take trials from the study until it holds enough, and the wait for
trials other machines run. search.py decides what a study queues; this module runs what is queued.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

from ..budget import deadline_passed
from .spaces import is_int, startup_count
from .storage import fail_dead_trials, is_url, open_storage, open_study, worker_tag
from .runners import Runner


def _sqlite(storage) -> bool:
    return not is_url(storage) or str(storage).startswith("sqlite")


def _run(runner: Runner, method: str, out, seed: int, device: str, overrides: dict, hooks: tuple) -> dict:
    """One trial: the method with the trial's values, validation only, no weights kept."""
    return runner.run(method, out, seed=seed, overrides=overrides, test=False, hooks=hooks, device=device,
                      keep_weights=False)


def _objective(runner: Runner, method: str, study_name_: str, out_root: Path, seed: int, device: str, base: dict,
               space: list[tuple]):
    import optuna
    from .. import distributed
    select = runner.method(method).train.select

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_tag())  # which machine and process runs it (first: liveness reads it)
        params = {}
        for f, lo, hi, log in space:
            if is_int(lo, hi, log, f):
                params[f] = trial.suggest_int(f, lo, hi)
            else:
                params[f] = trial.suggest_float(f, lo, hi, log=log)
        startup = trial.user_attrs.get("design") in ("startup", "extension", "transition")
        best = [-math.inf]
        out = Path(out_root) / study_name_.replace(":", "-") / f"trial{trial.number:03d}"
        distributed.broadcast_object(("trial", params, str(out)))  # data-parallel trial: every rank trains these
        _record_params(out, params)

        def report(state) -> bool | None:  # multi-fidelity: report the running best, stop a trailing trial
            if state.val is None:
                return None
            best[0] = max(best[0], state.val[select])
            trial.report(best[0], state.target_step)
            stop = not startup and trial.should_prune()
            if distributed.broadcast_object(stop):  # the other ranks stop with rank 0
                trial.set_user_attr("pruned_at", state.target_step)
                return False
            return None

        m = _run(runner, method, out, seed, device, {**base, **params}, (report,))
        from ..identity import check_identity
        study = trial.study
        ident = check_identity(study.user_attrs.get("identity"), m, f"trial {trial.number} of study {study_name_}")
        if "identity" not in study.user_attrs:
            study.set_user_attr("identity", ident)
        for k, v in m["val"].items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("train", m["train"])
        trial.set_user_attr("updates", m["updates"])
        trial.set_user_attr("best_step", m["best_step"])
        trial.set_user_attr("code", m.get("code"))  # the code that made it (a study may span several versions)
        if "pruned_at" in trial.user_attrs:
            raise optuna.TrialPruned()
        return m["val"][select]

    return objective


def _follow(runner: Runner, method: str, seed: int, device: str, base: dict) -> None:
    """Ranks > 0 of a data-parallel search: train each trial rank 0 announces (its parameters), stop with it."""
    from .. import distributed
    while True:
        msg = distributed.broadcast_object(None)
        if msg[0] in ("done", "finished"):
            return msg
        _, params, out = msg
        _record_params(out, params)

        def follow(state):
            return False if state.val is not None and distributed.broadcast_object(None) else None
        _run(runner, method, out, seed, device, {**base, **params}, (follow,))


def _record_params(out, params: dict) -> None:
    """Under torchrun, each rank writes the parameters it trains a trial with (TRIAL/params-rankR.json)."""
    from .. import distributed
    if distributed.active():
        import json
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"params-rank{distributed.rank()}.json").write_text(json.dumps(params))


def _worker(runner, method, storage, out_root, seed, device, base, space, total, threads):
    """One process of a (possibly parallel) search: run trials until the study holds `total` finished ones. Under
    torchrun rank 0 asks the study for trials and the other ranks train each with it (`_follow`)."""
    import optuna
    import torch
    from .. import distributed
    if threads:
        torch.set_num_threads(threads)
    if not distributed.is_main():
        return _follow(runner, method, seed, device, base)
    name = runner.study_name(method, seed)
    cfg = replace(runner.train_config(method), **base)
    study = open_study(name, open_storage(storage), startup_count(len(space)),
                       prune_warmup=max(1, int(0.4 * cfg.steps)), key=runner.seed_key(method, seed))
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def budget(study, trial):  # --budget: no new trial once the deadline has passed (the running one finishes)
        if deadline_passed():
            study.stop()
    try:
        if len(study.get_trials(deepcopy=False, states=done)) < total and not deadline_passed():
            study.optimize(_objective(runner, method, name, Path(out_root), seed, device, base, space),
                           callbacks=[optuna.study.MaxTrialsCallback(total, states=done), budget],
                           catch=(FloatingPointError,))
    finally:
        distributed.broadcast_object(("done",))


def _run_workers(args: tuple, jobs: int, device: str) -> None:
    if jobs <= 1:
        _worker(*args, threads=None)
        return
    import multiprocessing as mp
    threads = max(1, (os.cpu_count() or 1) // jobs) if device == "cpu" else 2
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=args, kwargs={"threads": threads}) for _ in range(jobs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"{len(failed)} search worker(s) failed (exit codes {failed}); run the same command again "
                           "to resume the study")


def wait_for_trials(study_name_: str, storage, args: tuple, jobs: int, device: str, poll: float = 10.0) -> None:
    """Until no trial of the study is running or waiting: trials other machines run are awaited (a dead one is
    failed by its heartbeat and queued again, and then run here)."""
    import time

    import optuna
    while True:
        study = optuna.load_study(study_name=study_name_, storage=open_storage(storage))
        if _sqlite(storage):  # a worker that died while we wait: its trial fails and its point is queued again
            fail_dead_trials(study)
        else:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        waiting = states.count(optuna.trial.TrialState.WAITING)
        if waiting and deadline_passed():  # queued points wait for the next call
            return
        if waiting:
            done = sum(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states)
            _run_workers(args[:-1] + (done + waiting,), jobs, device)
            continue
        if optuna.trial.TrialState.RUNNING not in states:
            return
        time.sleep(poll)
