"""Files a run writes, written so that nothing a user made is lost or silently overwritten.

- `atomic_save` / `atomic_write_text`: write to a temporary name, then rename (a reader, or a run killed
  mid-write, never sees half a file). The one place the kit writes checkpoints and result files.
- `RunFolder`: a training run's folder (`log.jsonl`, `last.pt`, `best.pt`). An occupied folder is refused
  unless resuming; a resumed checkpoint must belong to the same run (`identity`: model, initial weights,
  data, config), else a clear error says what differs. A folder whose run was killed before its first
  checkpoint simply starts again when resuming.
- `tower_fingerprint`: a short hash of a tower's weights (what a checkpoint or teacher belongs to).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

RUN_FILES = ("last.pt", "best.pt", "log.jsonl")


def atomic_save(obj, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


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
        occupied = [f for f in RUN_FILES if (self.path / f).exists()]
        if occupied and not resume:
            raise FileExistsError(f"{self.path} already holds a training run ({', '.join(occupied)}). Pass "
                                  f"{resume_hint} to continue it, or choose a new folder; nothing was overwritten.")
        if writer:
            check_writable(self.path, "the run folder")

    def restore(self, identity: dict) -> dict | None:
        """The checkpoint to continue from (None: start afresh). Refuses one that belongs to another run."""
        if self.path is None or not self.resume or not (self.path / "last.pt").exists():
            return None  # resuming a run killed before its first checkpoint: it simply starts again
        ckpt = torch.load(self.path / "last.pt", map_location="cpu", weights_only=False)
        theirs = ckpt.get("identity", {})
        diff = {k: (theirs.get(k), v) for k, v in identity.items() if theirs.get(k) != v}
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
        b = torch.load(self.path / "best.pt", map_location="cpu", weights_only=False)
        return {"visual": b["visual"], "head": b["head"]}


def _describe(key: str, theirs, ours) -> str:
    if key == "config" and isinstance(theirs, dict) and isinstance(ours, dict):
        changed = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        return f"another TrainConfig {changed}"
    names = {"model": "another model", "weights": "other initial weights", "target": "other target data",
             "generic": "other generic data", "classes": "another number of target classes"}
    return f"{names.get(key, key)} ({theirs} != {ours})"
