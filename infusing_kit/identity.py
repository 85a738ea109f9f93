"""What a run is besides its config and data: the weights it starts from, its thread count, torch and device
(`run_identity`), and the code that made it (`code_version`). Recorded in metrics.json and registry rows; a
comparison or search refuses to mix runs whose identity differs (`check_identity`).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from .pretrain import fingerprint


IDENTITY = ("weights", "threads", "torch", "device_kind")


def check_identity(expected: dict | None, metrics: dict, what: str) -> dict:
    """The identity (`run_identity`) of a finished run, refused when it differs from `expected` (None: the first)."""
    mine = {k: metrics.get(k) for k in IDENTITY}
    if expected is not None and mine != expected:
        diff = {k: (expected.get(k), mine[k]) for k in IDENTITY if expected.get(k) != mine[k]}
        raise ValueError(f"{what} was made with other starting weights, threads, torch or device than the rest of the "
                         f"comparison ({diff}; expected, found): its numbers would not be comparable. Run it again "
                         "under the same conditions (e.g. the same --jobs, which sets the threads per run), or start a "
                         "new comparison folder.")
    return mine


def run_identity(vlm, device: str) -> dict:
    """What changes a run's bits besides its config and data: the weights it starts from (their fingerprint), the
    CPU threads of its process (float sums are ordered differently with 1 and 2 threads), the device and the
    torch version. Recorded in metrics.json and registry rows; a comparison refuses to mix them."""
    return {"weights": fingerprint(vlm), "threads": torch.get_num_threads(), "torch": str(torch.__version__),
            "device_kind": torch.device(device).type}


@functools.lru_cache(maxsize=1)
def code_version() -> str | None:
    """The git commit of the kit's code (with '+changes' when its files differ from it), or None outside git. Read
    once per process (its first call; `run_setup` calls it when a run starts), so a run records the code it
    started with even if the files change while it runs."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "infusing_kit"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+changes" if dirty else "")) or None
