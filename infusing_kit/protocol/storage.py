"""Where a search's trials live: an SQLite file (one machine) or a shared database URL (many machines, with
heartbeats), the seeded sampler every study uses, and the trials read back (`trial_rows`).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path

HEARTBEAT = int(os.environ.get("INFUSING_KIT_HEARTBEAT", 20))  # seconds between a running trial's heartbeats in a
GRACE = int(os.environ.get("INFUSING_KIT_GRACE", 120))          # shared database; a trial without one for GRACE
                                                                # seconds is failed and queued again (its worker died)


def is_url(storage) -> bool:
    return "://" in str(storage)


SQLITE_HEADER = b"SQLite format 3\x00"
_CHECKED: set = set()   # SQLite files this process found whole (quick_check once per file)


def _shown(url: str) -> str:
    """A database URL as it may be printed (no password)."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (not a URL SQLAlchemy parses: print it with any password cut out)
        import re
        return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


def check_storage(storage, read_only: bool = False):
    """Check a --storage before any trial trains; returns the SQLite file's Path, or the database URL. One-line
    errors: a URL no storage takes (postgres://, http://, sqlite:// with two slashes), an SQLite file whose folder
    does not exist, an empty (0-byte), foreign or damaged file, and a file or folder that cannot be written (an
    SQLite storage is written even to continue a finished study; read_only: reading its trials is enough)."""
    s = str(storage)
    if not is_url(s):
        return check_sqlite_file(Path(s), create=True, read_only=read_only)
    scheme = s.split("://", 1)[0].lower()
    if scheme == "sqlite":
        if not s.startswith("sqlite:///") or len(s) == len("sqlite:///"):
            raise ValueError(f"--storage {s}: an SQLite URL has three slashes before a relative path "
                             "(sqlite:///runs/search.db) and four before an absolute one (sqlite:////data/search.db); "
                             "or give the file's path itself (runs/search.db)")
        return check_sqlite_file(Path(s[len("sqlite:///"):]), create=False, read_only=read_only)
    if scheme == "postgres":
        raise ValueError(f"--storage {_shown(s)}: write postgresql://... (SQLAlchemy does not take the postgres:// "
                         "alias)")
    if not scheme.startswith(("postgresql", "mysql")):
        raise ValueError(f"--storage {_shown(s)}: {scheme}:// is not a database URL; give an SQLite file (runs/"
                         "search.db) or a shared database (postgresql://user@host/db)")
    return s


def check_sqlite_file(path: Path, create: bool, read_only: bool = False) -> Path:
    import sqlite3
    what = f"--storage {path}"
    if path.is_dir():
        raise ValueError(f"{what} is a folder; give the path of an SQLite file in it (e.g. {path / 'search.db'})")
    folder = path.parent
    if not path.exists():
        if not folder.is_dir() and not create:
            raise ValueError(f"{what}: the folder {folder} does not exist; create it (mkdir -p {folder}) or give "
                             "another path")
        if read_only:
            raise FileNotFoundError(f"no Optuna storage at {path}")
        return path
    if path.stat().st_size == 0:
        raise ValueError(f"{what} is an empty file (0 bytes), not an Optuna storage: nothing was started in it. Give "
                         f"the storage's real path, or remove the empty file (rm {path}) to start a new study there")
    with open(path, "rb") as f:
        if f.read(16) != SQLITE_HEADER:
            raise ValueError(f"{what} is not an SQLite database (no SQLite header); give the path of a storage "
                             "`search` or `compare` wrote, or a new file name")
    key = (str(path.resolve()), path.stat().st_ino)
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
        try:
            check = "ok" if key in _CHECKED else con.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            con.close()
    except sqlite3.OperationalError as e:  # busy: another worker is writing (not damage); checked next time
        check = "busy" if "locked" in str(e) or "busy" in str(e) else str(e)
    except sqlite3.DatabaseError as e:
        check = str(e)
    if check == "ok":
        _CHECKED.add(key)
    elif check != "busy":
        raise ValueError(f"{what} is damaged (SQLite: {check}), e.g. truncated by a copy or a full disk; restore it "
                         "from a copy (a --state folder's search.db) or its trials (storage.restore_trials from a "
                         "trials.jsonl); nothing was changed")
    if not read_only and not (os.access(path, os.W_OK) and os.access(folder, os.W_OK)):
        raise PermissionError(f"{what} cannot be written (a read-only file system or no permission), and an SQLite "
                              "storage is written even to continue a finished study (its journal goes beside it). "
                              f"Copy it to a writable folder (cp {path} /tmp/) and pass that copy as --storage")
    return path


def open_storage(storage: str | Path, read_only: bool = False):
    """An Optuna storage: a SQLite file (one machine: the default) or a database URL (postgresql://...: many
    machines), checked first (`check_storage`). A shared database gets heartbeats, and a trial whose worker died
    is failed and queued again (RetryHeartbeatStaleTrialCallback) once its heartbeat is GRACE seconds old.
    read_only: an SQLite file opened for reading only (trial_rows)."""
    import optuna
    path = _sqlite_path(storage)
    if path is not None and not read_only and path.parent.is_dir() and not path.is_dir():
        # checked and created under the lock file beside it: a second process that opens the storage while the first
        # creates it found an empty file (refused as "0 bytes") or half a schema ("table studies already exists")
        with _locked(path):
            return sqlite_storage(check_storage(storage))
    checked = check_storage(storage, read_only=read_only)
    if isinstance(checked, Path):
        if read_only:
            return _sqlite_read_only(checked)
        checked.parent.mkdir(parents=True, exist_ok=True)
        with _locked(checked):
            return sqlite_storage(checked)
    import time
    import warnings

    from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError
    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    checked, heartbeat_interval=HEARTBEAT, grace_period=GRACE,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
        except (IntegrityError, ProgrammingError):  # another machine is creating the schema at this moment
            if attempt == 5:
                raise
            time.sleep(0.5 * (attempt + 1))
        except (SQLAlchemyError, ImportError) as e:
            first = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
            raise ValueError(f"--storage {_shown(checked)}: cannot open the database ({first}); check that the "
                             "server runs and that host, port, user, password and database name are right") from None


def _sqlite_path(storage) -> Path | None:
    """The file of an SQLite storage (a path or an sqlite:/// URL), unchecked; None for a server's URL."""
    s = str(storage)
    if not is_url(s):
        return Path(s)
    return Path(s[len("sqlite:///"):]) if s.startswith("sqlite:///") and len(s) > len("sqlite:///") else None


@contextlib.contextmanager
def _locked(path: Path):
    """The lock file beside an SQLite storage (PATH.lock), held: one process at a time."""
    import fcntl
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _sqlite_read_only(path: Path):
    """An SQLite storage opened read-only (immutable: no journal is written; a read-only file system works)."""
    import optuna
    return optuna.storages.RDBStorage(f"sqlite:///file:{path.resolve()}?mode=ro&immutable=1&uri=true")


def sqlite_storage(path: str | Path):
    """An SQLite storage whose trial state changes go one at a time, through a lock file beside it (PATH.lock).

    SQLite has no SELECT ... FOR UPDATE, so two workers that start a trial at the same moment could both move the
    same queued trial to RUNNING and run it twice (optuna#4621; measured: 4 processes starting 60 queued trials
    started 67-73). Under the lock, the check that the trial is still waiting and its move to RUNNING are one step."""
    import optuna

    class LockedSQLite(optuna.storages.RDBStorage):
        @contextlib.contextmanager
        def locked(self):
            held = self.__dict__.setdefault("_held", set())  # threads holding the lock through this storage
            me = threading.get_ident()
            if me in held:  # already held here (study_lock): a second flock would wait on itself
                yield
                return
            with _locked(path):
                held.add(me)
                try:
                    yield
                finally:
                    held.discard(me)

        def set_trial_state_values(self, trial_id, state, values=None):
            with self.locked():
                return super().set_trial_state_values(trial_id, state, values)

    return LockedSQLite(f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 120}})  # (open_storage: locked)


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


@contextlib.contextmanager
def study_lock(store, name: str):
    """One process at a time, on every machine that shares `store`, decides what a study queues next (its set-up
    and start-up design, an edge extension, transition points): it reads the study, decides and queues under the
    lock, and the next process reads what the first queued. Without it two workers that opened a new study at the
    same moment both found it empty and both queued its design, and every start-up point ran twice (a fresh-clone
    CI run on PostgreSQL: 12 trials, 6 points). SQLite: the lock file beside the storage; PostgreSQL: an advisory
    lock; MySQL: GET_LOCK."""
    if hasattr(store, "locked"):  # an SQLite file (sqlite_storage)
        with store.locked():
            yield
        return
    from sqlalchemy import text
    engine = store.engine
    dialect = engine.dialect.name
    digest = hashlib.sha256(f"infusing_kit:{name}".encode()).digest()
    with engine.connect() as conn:
        if dialect == "postgresql":
            key = int.from_bytes(digest[:8], "big", signed=True)
            take, give = text("SELECT pg_advisory_lock(:k)"), text("SELECT pg_advisory_unlock(:k)")
        elif dialect in ("mysql", "mariadb"):
            key = f"ik-{digest.hex()[:40]}"  # MySQL lock names: 64 characters at most
            take, give = text("SELECT GET_LOCK(:k, -1)"), text("SELECT RELEASE_LOCK(:k)")
        else:
            raise ValueError(f"--storage {_shown(str(engine.url))}: no cross-machine lock for the {dialect} "
                             "dialect; use an SQLite file (one machine) or PostgreSQL (many machines)")
        conn.execute(take, {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(give, {"k": key})
            conn.commit()


def study_seed(name: str) -> int:
    """A sampler seed of the study's own (from its name), so two studies never draw the same points."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def trial_rows(storage: str | Path) -> list[dict]:
    """Every finished or pruned trial of every study in a storage (an SQLite file or a database URL), one row each:
    {"study", "method", "seed", "smoke", "trial", "state", "design", "params", "val", "train", "updates"}
    (validation only: trials never see test data). What a study is comes from its user attributes."""
    import optuna
    store = open_storage(storage, read_only=True)
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


# ---------------------------------------------------------------------------- which running trials are dead (SQLite)
def worker_tag() -> str:
    """What a trial records as its worker ("worker" user attribute): host:pid of the process that runs it."""
    import socket
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_start(pid: int) -> float | None:
    """When a process started (seconds since the epoch; Linux /proc), or None where that cannot be read."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])
        boot = next(int(l.split()[1]) for l in Path("/proc/stat").read_text().splitlines() if l.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def worker_alive(tag: str, started) -> bool:
    """Whether the worker `tag` (host:pid) that started a trial at `started` (a datetime) still runs. An SQLite
    storage is one machine's: a trial of another host was running where the file was copied from (dead). A pid that
    no longer exists, or that a process started after the trial now holds (the pid was reused), is dead."""
    import socket
    host, _, pid = str(tag).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    began = _process_start(int(pid))
    return not (began is not None and started is not None and began > started.timestamp() + 1)


def dead_running_trials(study) -> list:
    """The study's RUNNING trials whose worker is dead (`worker_alive`); a trial that names no worker yet is a
    worker's that is just starting it, dead only once it started more than GRACE seconds ago."""
    import datetime

    import optuna
    now = datetime.datetime.now()
    dead = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        tag = t.user_attrs.get("worker")
        if tag is not None:
            if not worker_alive(tag, t.datetime_start):
                dead.append(t)
        elif t.datetime_start is None or (now - t.datetime_start).total_seconds() > GRACE:
            dead.append(t)
    return dead


def fail_dead_trials(study) -> int:
    """On an SQLite storage (one machine): fail the running trials whose worker process is dead, and queue a dead
    start-up, extension or transition point again (those points are the design; TPE proposes anew). A live
    worker's trial (another `search` process on the same file, a parallel worker) is never touched. Returns the
    trials failed."""
    import optuna
    n = 0
    for t in dead_running_trials(study):
        try:
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue  # another process failed (or its worker finished) it first
        n += 1
        if t.user_attrs.get("design") in ("startup", "extension", "transition"):  # (its point, asked for or not)
            study.enqueue_trial(t.params or t.system_attrs.get("fixed_params", {}),
                                user_attrs={"design": t.user_attrs["design"]})
    return n
