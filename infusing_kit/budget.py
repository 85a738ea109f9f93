"""A long job's time budget, and what it may reuse inside one comparison.

A comparison takes hours on 2 CPU cores, longer than a working session. `compare --budget MINUTES` sets a deadline
(`set_deadline`, kept in the environment so that worker processes see it too); every search worker and every run
checks it only *before* it starts a trial or a run, so the job stops at a clean boundary: finished trials and runs
are kept, nothing is half-written, and the same command resumes. `BudgetSpent` unwinds a stage when it is reached.

`cached(kind, key, compute)`: within one comparison (`INFUSING_KIT_RUN_CACHE`, set by `compare` to OUT/cache), a
value that depends only on the starting weights and the data (the pretrained model's test metrics, EWC's Fisher)
is computed once and read back by every later run with the same key. Outside a comparison nothing is cached.

`save_state` / `restore_state`: what a comparison needs to resume, copied to and from a folder that git tracks
(`compare --state results/in-progress/NAME`), since a session's untracked folders do not outlive it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable

DEADLINE = "INFUSING_KIT_DEADLINE"      # seconds since the epoch; absent: no budget
CACHE = "INFUSING_KIT_RUN_CACHE"        # a folder; absent: no cache


class BudgetSpent(RuntimeError):
    """The job's --budget ran out; what finished is kept and the same command resumes."""


def set_deadline(minutes: float | None) -> None:
    if minutes is None:
        os.environ.pop(DEADLINE, None)
    else:
        if minutes <= 0:
            raise ValueError(f"--budget {minutes}: give the minutes this call may start work for (> 0)")
        os.environ[DEADLINE] = str(time.time() + 60 * minutes)


def deadline_passed() -> bool:
    d = os.environ.get(DEADLINE)
    return d is not None and time.time() >= float(d)


def check_budget(what: str) -> None:
    if deadline_passed():
        raise BudgetSpent(f"the --budget ran out before {what}")


def key_of(*parts) -> str:
    """A cache key: sha256 of the parts' JSON (16 hex digits)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached(kind: str, key: str, compute: Callable, save: Callable | None = None, load: Callable | None = None):
    """compute() once per (kind, key) inside a comparison; JSON values unless save(value, path) / load(path) are
    given. Written atomically (a parallel run computing the same value at the same time writes the same bits)."""
    root = os.environ.get(CACHE)
    if not root:
        return compute()
    path = Path(root) / kind / f"{key}{'.json' if save is None else '.pt'}"
    if path.exists():
        return json.loads(path.read_text()) if load is None else load(path)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if save is None:
        tmp.write_text(json.dumps(value))
    else:
        save(value, tmp)
    os.replace(tmp, path)
    return value


STATE_FILES = ("search.db", "chosen.json", "results.jsonl", "trials.jsonl")


def save_state(out: str | Path, state: str | Path, storage=None) -> list[Path]:
    """Copy what a comparison needs to resume into `state`: its Optuna storage (when it is OUT's SQLite file),
    chosen.json, the registry, and every finished run's metrics.json (a run with one is never run again). Weights
    are not copied: post-hoc rows run in the same call as the runs they merge, so nothing later needs them. Each run's
validation history (run/log.jsonl) goes with it."""
    import shutil
    out, state = Path(out), Path(state)
    state.mkdir(parents=True, exist_ok=True)
    written = []
    for name in STATE_FILES:
        if (out / name).exists() and (name != "search.db" or storage is None):
            shutil.copy2(out / name, state / name)
            written.append(state / name)
    for m in sorted((out / "runs").glob("*/*/metrics.json")):
        if m.parent.parent.name == "search":
            continue  # trials live in the storage
        for f in (m, m.parent / "run" / "log.jsonl"):  # (the validation history: stage 2 reads the calibration's)
            if f.exists():
                dest = state / "runs" / f.relative_to(out / "runs")
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest)
                written.append(dest)
    return written


def restore_state(state: str | Path, out: str | Path) -> None:
    """The reverse of `save_state`, into a folder that holds no comparison yet."""
    import shutil
    state, out = Path(state), Path(out)
    if (out / "chosen.json").exists():
        raise FileExistsError(f"{out} already holds a comparison (chosen.json); resume it there, or restore the state "
                              f"{state} into an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in STATE_FILES:
        if (state / name).exists():
            shutil.copy2(state / name, out / name)
    for m in sorted((state / "runs").rglob("*")):
        if m.is_file():
            dest = out / "runs" / m.relative_to(state / "runs")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(m, dest)
