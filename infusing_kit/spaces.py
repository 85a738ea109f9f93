"""Search spaces: where a study's points go (search.py's docstring says why).

A space is a list of (field, low, high, log) rows. `startup_points` fills it (a Latin hypercube);
`extend_space` grows a range whose best value sits at its edge, up to the field's hard limit;
`transition_points` puts points where a one-field study's score changes by more than the seed noise;
`is_flat` says when no setting can be told apart; `constrained_choice` is the constraint rule.
"""
from __future__ import annotations

import math

EDGE = 0.15            # outer share of a range that counts as its edge
MAX_EXTENSIONS = 3
HARD_LIMITS = {        # a range never grows past these
    "lr_backbone": (1e-7, 1.0), "lr_head": (1e-6, 10.0), "lp_ft_steps": (0, None), "freeze_blocks": (0, None),
    "sparse": (1e-6, 1.0),        # a fraction of the tower's entries
    "average_tau": (1.0, 1e6),    # an EMA's time constant, in steps
    "average_every": (1, None),   # steps between the weights a uniform average takes (at most the schedule)
}
DEFAULT_LIMITS = (1e-8, 1e8)   # loss weights


def startup_points(space: list[tuple], n: int, seed: int) -> list[dict]:
    """n space-filling points (a Latin hypercube, optimised for spread when d > 1) mapped onto the ranges."""
    from scipy.stats import qmc
    d = len(space)
    lhs = qmc.LatinHypercube(d, scramble=True, rng=seed, optimization="random-cd" if d > 1 else None)
    return [{f: from_unit(u[i], lo, hi, log) for i, (f, lo, hi, log) in enumerate(space)} for u in lhs.random(n)]


def from_unit(u: float, lo, hi, log: bool):
    if is_int(lo, hi, log):
        return int(min(hi, math.floor(lo + u * (hi - lo + 1))))
    if log:
        return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))
    return float(lo + u * (hi - lo))


def to_unit(v, lo, hi, log: bool) -> float:
    if log:
        return (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (v - lo) / (hi - lo) if hi > lo else 0.5


def is_int(lo, hi, log) -> bool:
    return isinstance(lo, int) and isinstance(hi, int) and not log


def hard_limits(field: str, steps: int, n_blocks: int | None) -> tuple:
    lo, hi = HARD_LIMITS.get(field, DEFAULT_LIMITS)
    if field == "lp_ft_steps":
        hi = steps - 1
    if field == "average_every":
        hi = steps
    if field == "freeze_blocks":
        hi = n_blocks if n_blocks is not None else 1_000
    return lo, hi


def transition_points(space: list[tuple], trials: list[tuple[dict, float]], noise: float, max_points: int = 3,
                      min_gap: float = 1 / 16) -> list[dict]:
    """Midpoints (in the range's own scale) between neighbouring tried values of a one-field search whose scores
    differ by more than 2 x noise and that lie more than `min_gap` of the range apart; the largest gaps first."""
    if len(space) != 1 or noise <= 0:
        return []
    f, lo, hi, log = space[0]
    pts = sorted((to_unit(p[f], lo, hi, log), v) for p, v in trials)
    gaps = [(b[0] - a[0], (a[0] + b[0]) / 2) for a, b in zip(pts, pts[1:])
            if abs(b[1] - a[1]) > 2 * noise and b[0] - a[0] > min_gap]
    out = []
    for _, mid in sorted(gaps, reverse=True)[:max_points]:
        v = from_unit(mid, lo, hi, log)
        if all(v != p[f] for p, _ in trials):
            out.append({f: v})
    return out


def is_flat(values: list[float], noise: float) -> bool:
    """Every finished trial within 2 x noise of the best: the study cannot tell its settings apart."""
    return bool(values) and noise > 0 and max(values) - min(values) <= 2 * noise


def constrained_choice(rows: list[dict], fine_key: str, generic_key: str, threshold: float) -> dict | None:
    """The constraint rule: among finished trials {"params", "val"} whose fine-grained validation is >= threshold,
    the one with the best generic validation (ties: the earlier trial). None when no trial qualifies."""
    ok = [r for r in rows if r["val"].get(fine_key, -1) >= threshold]
    return max(ok, key=lambda r: r["val"][generic_key]) if ok else None


def extend_space(space: list[tuple], trials: list[dict], best: dict, steps: int,
                 n_blocks: int | None = None) -> tuple[list[tuple], list[str], list[str]]:
    """Grow each range whose best value sits at its edge (see module docstring).

    Returns (new space, fields extended, fields whose best value is at a hard limit and cannot grow)."""
    new, grown, stuck = [], [], []
    for f, lo, hi, log in space:
        v = best[f]
        values = [t[f] for t in trials]
        u = to_unit(v, lo, hi, log)
        hard_lo, hard_hi = hard_limits(f, steps, n_blocks)
        side = "low" if (u <= EDGE and v <= min(values)) else "high" if (u >= 1 - EDGE and v >= max(values)) else None
        if side is None:
            new.append((f, lo, hi, log))
            continue
        if (side == "low" and lo <= hard_lo) or (side == "high" and hi >= hard_hi):
            stuck.append(f)
            new.append((f, lo, hi, log))
            continue
        if log:
            half = (math.log(hi) - math.log(lo)) / 2
            lo2, hi2 = (math.exp(math.log(lo) - half), hi) if side == "low" else (lo, math.exp(math.log(hi) + half))
        else:
            half = (hi - lo) / 2
            lo2, hi2 = (lo - half, hi) if side == "low" else (lo, hi + half)
        lo2, hi2 = max(lo2, hard_lo), min(hi2, hard_hi)
        if is_int(lo, hi, log):
            lo2, hi2 = int(math.floor(lo2)), int(math.ceil(hi2))
        new.append((f, lo2, hi2, log))
        grown.append(f"{f}: {side} edge, [{lo:g}, {hi:g}] -> [{lo2:g}, {hi2:g}]")
    return new, grown, stuck
