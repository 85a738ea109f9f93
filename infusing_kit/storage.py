"""Where a search's trials live: an SQLite file (one machine) or a shared database URL (many machines, with
heartbeats), the seeded sampler every study uses, and the trials read back (`trial_rows`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

HEARTBEAT = int(os.environ.get("INFUSING_KIT_HEARTBEAT", 20))  # seconds between a running trial's heartbeats in a
GRACE = int(os.environ.get("INFUSING_KIT_GRACE", 120))          # shared database; a trial without one for GRACE
                                                                # seconds is failed and queued again (its worker died)


def is_url(storage) -> bool:
    return "://" in str(storage)


def open_storage(storage: str | Path):
    """An Optuna storage: a SQLite file (one machine: the default) or a database URL (postgresql://...: many
    machines). A shared database gets heartbeats, and a trial whose worker died is failed and queued again
    (RetryHeartbeatStaleTrialCallback) once its heartbeat is GRACE seconds old."""
    import optuna
    if is_url(storage):
        if str(storage).startswith("sqlite"):
            return sqlite_storage(str(storage).split(":///", 1)[1])
        import time
        import warnings

        from sqlalchemy.exc import IntegrityError, ProgrammingError
        for attempt in range(6):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        str(storage), heartbeat_interval=HEARTBEAT, grace_period=GRACE,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
            except (IntegrityError, ProgrammingError):  # another machine is creating the schema at this moment
                if attempt == 5:
                    raise
                time.sleep(0.5 * (attempt + 1))
    path = Path(storage)
    path.parent.mkdir(parents=True, exist_ok=True)
    return sqlite_storage(path)


def sqlite_storage(path: str | Path):
    """An SQLite storage whose trial state changes go one at a time, through a lock file beside it (PATH.lock).

    SQLite has no SELECT ... FOR UPDATE, so two workers that start a trial at the same moment could both move the
    same queued trial to RUNNING and run it twice (optuna#4621; measured: 4 processes starting 60 queued trials
    started 67-73). Under the lock, the check that the trial is still waiting and its move to RUNNING are one step."""
    import fcntl

    import optuna

    class LockedSQLite(optuna.storages.RDBStorage):
        def set_trial_state_values(self, trial_id, state, values=None):
            with open(f"{path}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                return super().set_trial_state_values(trial_id, state, values)

    return LockedSQLite(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 120}})


def trial_seeded_sampler(seed: int, n_startup: int):
    import optuna

    class TrialSeededTPE(optuna.samplers.TPESampler):
        """TPE whose randomness for a trial depends only on (study seed, finished trials so far, trials other
        workers are running): a study killed and resumed proposes what an uninterrupted one would (one worker),
        and parallel workers that start a trial at the same moment draw different candidates (the same seed in
        two workers proposed the same point twice)."""

        def before_trial(self, study, trial):
            done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                optuna.trial.TrialState.PRUNED)))
            earlier = sum(t.number < trial.number for t in study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))  # running in other workers, started first
            s = (seed + 7919 * done + 104729 * earlier) % 2**31
            self._rng.rng.seed(s)
            self._random_sampler._rng.rng.seed(s)
            super().before_trial(study, trial)

    return TrialSeededTPE(seed=seed, n_startup_trials=n_startup, multivariate=True, constant_liar=True)


def open_study(name: str, storage, n_startup: int, prune_warmup: int, key: str | None = None):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    study.sampler = trial_seeded_sampler(study_seed(key or name), n_startup)  # its own seed per study
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=n_startup, n_warmup_steps=prune_warmup)
    return study


def study_seed(name: str) -> int:
    """A sampler seed of the study's own (from its name), so two studies never draw the same points."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def trial_rows(storage: str | Path) -> list[dict]:
    """Every finished or pruned trial of every study in a storage (an SQLite file or a database URL), one row each:
    {"study", "method", "seed", "smoke", "trial", "state", "design", "params", "val", "train", "updates"}
    (validation only: trials never see test data). What a study is comes from its user attributes."""
    import optuna
    if not is_url(storage) and not Path(storage).exists():
        raise FileNotFoundError(f"no Optuna storage at {storage}")
    store = open_storage(storage)
    rows = []
    for s in optuna.get_all_study_summaries(store):
        study = optuna.load_study(study_name=s.study_name, storage=store)
        name, _, seed = s.study_name.rpartition("-seed")
        attrs0 = study.user_attrs
        method = attrs0.get("method", name.removesuffix("-smoke").split(":")[-1])
        smoke = (attrs0.get("runner") or {}).get("smoke", name.endswith("-smoke"))
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED)):
            attrs = dict(t.user_attrs)
            attrs.pop("identity", None)
            worker = attrs.pop("worker", None)
            rows.append({"study": s.study_name, "method": method, "seed": int(attrs0.get("seed", seed)),
                         "smoke": smoke, "trial": t.number, "state": t.state.name.lower(),
                         "design": attrs.pop("design", "tpe"), "params": t.params,
                         "train": attrs.pop("train", None), "updates": attrs.pop("updates", None),
                         "pruned_at": attrs.pop("pruned_at", None), "best_step": attrs.pop("best_step", None),
                         "worker": worker, "val": attrs})
    return rows


def restore_trials(rows: list[dict], storage: str | Path, space: list, select: str, attrs: dict | None = None) -> int:
    """Put one study's trials, as `trial_rows` wrote them (a committed trials.jsonl), back into a storage whose copy
    of the study was lost; returns the trials added. space: the study's [field, low, high, log] ranges (its
    chosen.json "space"); select: the validation key that was its objective; attrs: the study's user attributes.
    A study that already holds trials is refused (nothing is mixed or added twice). `trial_rows` of the storage
    then gives the same rows back."""
    import optuna
    names = {r["study"] for r in rows}
    if len(names) != 1:
        raise ValueError(f"restore_trials takes the rows of one study, got {sorted(names)}")
    name = names.pop()
    study = optuna.create_study(study_name=name, storage=open_storage(storage), direction="maximize",
                                load_if_exists=True)
    if study.trials:
        raise ValueError(f"{storage} already holds {len(study.trials)} trials of {name}; nothing was added")
    for k, v in (attrs or {}).items():
        study.set_user_attr(k, v)
    dists = {f: optuna.distributions.FloatDistribution(lo, hi, log=log) for f, lo, hi, log in space}
    for r in sorted(rows, key=lambda r: r["trial"]):
        complete = r["state"] == "complete"
        user = {**r["val"], "design": r["design"], "train": r["train"], "updates": r["updates"],
                "best_step": r["best_step"], **({"pruned_at": r["pruned_at"]} if r.get("pruned_at") is not None else {}),
                **({"worker": r["worker"]} if r.get("worker") else {})}
        study.add_trial(optuna.trial.create_trial(
            params=r["params"], distributions={f: dists[f] for f in r["params"]}, user_attrs=user,
            value=r["val"][select] if complete else None,
            state=optuna.trial.TrialState.COMPLETE if complete else optuna.trial.TrialState.PRUNED))
    return len(rows)
