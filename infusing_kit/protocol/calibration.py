"""Stage 2 of the comparison: from the baseline's calibration curves (one per search seed), the schedule length at
which fine-grained validation has flattened for every seed (`flat_length`, `choose_schedule`), and the seed noise
of the selection score with naive's own level (`seed_noise`), against which searches judge differences.
"""
from __future__ import annotations

import math

import numpy as np

from ..metrics import K

FLAT_TOL = 0.03           # fine-grained validation may gain less than this over the last FLAT_FRAC of a schedule
FLAT_FRAC = 0.2
MARGIN = 1.25             # schedule = flat length x MARGIN (held-out seeds may learn a little more slowly)

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
