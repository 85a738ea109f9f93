"""Files a run writes, written so that nothing a user made is lost or silently overwritten.

- `atomic_save` / `atomic_write_text`: write to a temporary name, then rename (a reader, or a run killed
  mid-write, never sees half a file). The one place the kit writes checkpoints and result files.
- `RunFolder`: a training run's folder (`log.jsonl`, `last.pt`, `best.pt`). An occupied folder is refused
  unless resuming; a resumed checkpoint must belong to the same run (`identity`: model, initial weights,
  data, config), else a clear error says what differs. A folder whose run was killed before its first
  checkpoint simply starts again when resuming. `last.pt` and `best.pt` are read with torch's safe loader
  (`safe_load`: tensors and plain containers only), so a crafted file in a run folder cannot run code on --resume.
- `tower_fingerprint`: a short hash of a tower's weights (what a checkpoint or teacher belongs to).
- `FolderLock`: one process per run folder. An exclusive POSIX lock (lockf) on FOLDER/.lock, held by the run's
  process for its life and released by the operating system when that process ends in any way (a kill -9 leaves
  no stale lock, and its DataLoader workers never hold it); a second process is refused at once, told which
  process holds the folder.
- Disk full: every write here is to a temporary name first; a write that fails removes its partial file and says
  that the disk is full (or what else failed) and that nothing was replaced.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import torch

RUN_FILES = ("last.pt", "best.pt", "log.jsonl")
LEGACY_KEYS = ("validation",)   # identity keys a checkpoint of an older kit lacks (accepted when absent)


def _atomic(path: str | Path, write) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        full = getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or "No space" in str(e)
        why = "the disk is full" if full else f"the write failed ({e})"
        raise OSError(errno.ENOSPC if full else getattr(e, "errno", None) or errno.EIO,
                      f"cannot write {path}: {why}; the partial file was removed and nothing was replaced. Free "
                      "space (or choose another folder) and run the same command again to continue") from None
    return path


def atomic_save(obj, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: tmp.write_text(text))


class FolderLock:
    """An exclusive lock on folder/.lock for as long as the object lives (or until `release`). Raises
    `FolderBusyError` at once when another process holds it.

    A POSIX record lock (fcntl.lockf), which belongs to the process that took it: child processes (DataLoader
    workers, forked before or after) do not hold it, so a run killed with kill -9 frees its folder at once even
    while its workers are still exiting (an flock stayed held by them for seconds: "in use by process PID", that
    PID dead). Within one process a folder is held once (`_HELD`: a POSIX lock does not exclude its own process)."""

    _HELD: set = set()

    def __init__(self, folder: str | Path, what: str = "--out"):
        import fcntl
        self.path = Path(folder) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        self._f = None
        if self._key in FolderLock._HELD:
            raise FolderBusyError(f"{what} {folder} is in use by this process (process {os.getpid()}): two runs in "
                                  "one folder would overwrite each other; choose another folder (nothing was changed)")
        f = open(self.path, "a+")
        try:
            fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise FolderBusyError(f"{what} {folder} is in use by {holder}: two runs in one folder would overwrite each "
                                  "other. Wait for it to finish, or choose another folder (nothing was changed)") from None
        self._f = f
        FolderLock._HELD.add(self._key)
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}")
        f.flush()

    def release(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()  # (closing the file releases the POSIX lock)
            FolderLock._HELD.discard(self._key)

    def __del__(self):
        try:
            self.release()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class FolderBusyError(RuntimeError):
    pass


def tower_fingerprint(tower: torch.nn.Module) -> str:
    """sha256 over a module's state (names, shapes, bytes), 16 hex digits."""
    h = hashlib.sha256()
    for k, v in sorted(tower.state_dict().items()):
        h.update(f"{k}|{tuple(v.shape)}|{v.dtype}".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_writable(folder: str | Path, what: str = "--out") -> Path:
    """Create `folder` (and parents) and prove it is writable, before any work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"{what} {folder} is not writable ({e.strerror}); choose a folder you can write to") from None
    return folder


class RunFolder:
    """The on-disk side of train(); `None` folder = keep nothing (every method is then a no-op)."""

    def __init__(self, out_dir: str | Path | None, resume: bool, resume_hint: str = "resume=True", writer: bool = True):
        self.path = Path(out_dir) if out_dir is not None else None
        self.resume, self.hint, self.writer = resume, resume_hint, writer  # writer=False: read, never write (ranks > 0)
        if self.path is None:
            return
        self.lock = None
        if writer:  # first the lock: a second process is told the folder is busy, not that a run was interrupted
            check_writable(self.path, "the run folder")
            self.lock = FolderLock(self.path, "the run folder")
        occupied = [f for f in RUN_FILES if (self.path / f).exists()]
        if occupied and not resume:
            self.close()
            raise FileExistsError(f"{self.path} already holds a training run ({', '.join(occupied)}). Pass "
                                  f"{resume_hint} to continue it, or choose a new folder; nothing was overwritten.")

    def close(self) -> None:
        """Release the folder (the lock)."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()

    def restore(self, identity: dict, config_defaults: dict | None = None) -> dict | None:
        """The checkpoint to continue from (None: start afresh). Refuses one that belongs to another run.
        config_defaults: the TrainConfig defaults; a field the checkpoint's config lacks (one the kit added since it
        was written) counts as its default, the value that switches it off."""
        if self.path is None or not self.resume or not (self.path / "last.pt").exists():
            return None  # resuming a run killed before its first checkpoint: it simply starts again
        ckpt = safe_load(self.path / "last.pt")
        theirs = dict(ckpt.get("identity", {}))
        if config_defaults is not None and isinstance(theirs.get("config"), dict):
            theirs["config"] = {**config_defaults, **theirs["config"]}
        # a checkpoint written before its identity held a key (LEGACY_KEYS) is not refused for it: it resumes, and
        # its next checkpoint records the key (refusing would strand every run interrupted before the change)
        diff = {k: (theirs.get(k), v) for k, v in identity.items() if theirs.get(k) != v
                and not (k in LEGACY_KEYS and k not in theirs)}
        if diff:
            what = "; ".join(_describe(k, a, b) for k, (a, b) in diff.items())
            raise ValueError(f"{self.path / 'last.pt'} belongs to another run: {what}. Resume with the same model, "
                             "data and settings, or start in a new folder.")
        return ckpt

    def start_log(self, history: list[dict]) -> None:
        """(Re)write log.jsonl from the checkpoint's history: a resumed run has no duplicate or orphan lines."""
        if self.path is not None and self.writer:
            atomic_write_text("".join(json.dumps(h) + "\n" for h in history), self.path / "log.jsonl")
            if not history and (self.path / "best.pt").exists():  # left by an attempt killed before last.pt
                (self.path / "best.pt").unlink()

    def log(self, record: dict) -> None:
        if self.path is not None and self.writer:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, name: str, obj: dict) -> None:
        if self.path is not None and self.writer:
            atomic_save(obj, self.path / name)

    def best_state(self) -> dict | None:
        if self.path is None or not (self.path / "best.pt").exists():
            return None
        b = safe_load(self.path / "best.pt")
        return {"visual": b["visual"], "head": b["head"]}


def safe_load(path: Path) -> dict:
    """A resume file read with torch's safe loader (weights_only=True: tensors, dicts, lists, tuples, strings,
    numbers; no other object is built, so a crafted file cannot run code). Everything the kit saves is of those
    types, so every checkpoint it wrote, old ones included, loads; anything else is refused unread."""
    import pickle
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a checkpoint this kit can load safely ({why[:200]}); it was not used. "
                         "Delete it to start that run again, or resume from a folder the kit wrote") from None
    if not isinstance(ckpt, dict) or "visual" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint this kit wrote (no 'visual' weights); delete it to start that "
                         "run again")
    return ckpt


def _describe(key: str, theirs, ours) -> str:
    if key == "config" and isinstance(theirs, dict) and isinstance(ours, dict):
        changed = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        return f"another TrainConfig {changed}"
    names = {"model": "another model", "weights": "other initial weights", "target": "other target data",
             "generic": "other generic data", "classes": "another number of target classes",
             "validation": "other validation data"}
    return f"{names.get(key, key)} ({theirs} != {ours})"
