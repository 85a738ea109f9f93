"""Search spaces: where a study's points go (search.py's docstring says why).

A space is a list of (field, low, high, log) rows; a study spends `study_budget(d)` finished trials on it, the
first `startup_count(d)` of them `startup_points` (a Latin hypercube);
`extend_space` grows a range whose best value sits at its edge and is still rising, up to the field's hard limit;
`transition_points` puts points where a selection rule decides (the best's plateau edge, the constraint's crossing);
`is_flat` says when no setting can be told apart; `constrained_choice` is the constraint rule.
"""
from __future__ import annotations

import math

from ..trainconfig import Limits, limits

EDGE = 0.15            # outer share of a linear range that counts as its edge ...
EDGE_LOG = 0.05        # ... and of a log range (a log range spans decades: 5% of it is already a wide strip)
RISING = 0.25          # "still rising": the best beats every tried value within this share of the range inward
MAX_EXTENSIONS = 3
DEFAULT_LIMITS = Limits().search_range(0, None)  # a loss weight's range never grows past these (trainconfig.LIMITS)


def study_budget(d: int) -> int:
    """Finished trials of a d-field study, extension and transition points included: 12 for one field, 20 for two
    (the best of the first 12 trials of a one-field study was within 0.9 sigma of the best of about 20 in 11 of
    11 studies of the near world's first comparison)."""
    return 4 + 8 * d


def startup_count(d: int) -> int:
    """Space-filling start-up points of a d-field study (never pruned)."""
    return 6 * d


def _reserve(d: int, total: int) -> int:
    """Trials kept back from the start-up and TPE phase for edge extensions and transition points."""
    return max(0, min(3 if d == 1 else 2, total - startup_count(d)))


def startup_points(space: list[tuple], n: int, seed: int) -> list[dict]:
    """n space-filling points (a Latin hypercube, optimised for spread when d > 1) mapped onto the ranges."""
    from scipy.stats import qmc
    d = len(space)
    lhs = qmc.LatinHypercube(d, scramble=True, rng=seed, optimization="random-cd" if d > 1 else None)
    return [{f: from_unit(u[i], lo, hi, log, f) for i, (f, lo, hi, log) in enumerate(space)} for u in lhs.random(n)]


def from_unit(u: float, lo, hi, log: bool, field: str | None = None):
    if is_int(lo, hi, log, field):
        return int(min(hi, math.floor(lo + u * (hi - lo + 1))))
    if log:
        return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))
    return float(lo + u * (hi - lo))


def to_unit(v, lo, hi, log: bool) -> float:
    if log:
        return (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (v - lo) / (hi - lo) if hi > lo else 0.5


def is_int(lo, hi, log, field: str | None = None) -> bool:
    """Whether a range is searched on integers: by its TrainConfig field's type (`int_field`), never by how its
    bounds are written ({field = "sparse", low = 0, high = 1} is a float range). Without a field (a range of no
    TrainConfig field): integer bounds on a linear scale."""
    if field is not None and field in _field_types():
        return int_field(field) and not log
    return isinstance(lo, int) and isinstance(hi, int) and not log


def int_field(field: str) -> bool:
    """A TrainConfig field that holds an integer (steps, lp_ft_steps, freeze_blocks, average_every, ...)."""
    return _field_types().get(field) == "int"


def _field_types() -> dict:
    from dataclasses import fields

    from ..trainconfig import TrainConfig
    return {f.name: f.type if isinstance(f.type, str) else f.type.__name__ for f in fields(TrainConfig)}


def hard_limits(field: str, steps: int, n_blocks: int | None) -> tuple:
    """How far a search may grow a field's range: its `trainconfig.limits(field).search`, with the bounds that
    depend on the run (the schedule's length, the tower's blocks) worked out."""
    return limits(field).search_range(steps, n_blocks)


def transition_points(space: list[tuple], trials: list[tuple], noise: float, max_points: int = 3,
                      min_gap: float = 1 / 16, threshold: float | None = None) -> list[dict]:
    """Midpoints (in the range's own scale) of gaps between neighbouring tried values of a one-field search, where a
    selection rule decides: trials are (params, score) or (params, score, fine-grained validation). First the gaps
    beside the best trial whose scores differ by more than 2 x noise (the edge of its plateau), then gaps across
    which fine-grained validation crosses `threshold` (the constraint rule's); each wider than `min_gap` of the
    range. Gaps elsewhere (the collapsed side of a range) get no points."""
    if len(space) != 1 or noise <= 0:
        return []
    f, lo, hi, log = space[0]
    pts = sorted((to_unit(t[0][f], lo, hi, log), t[1], t[2] if len(t) > 2 else None) for t in trials)
    if len(pts) < 2:
        return []
    best = max(range(len(pts)), key=lambda i: pts[i][1])
    wide = lambda i: pts[i + 1][0] - pts[i][0] > min_gap
    plateau = [i for i in (best - 1, best) if 0 <= i < len(pts) - 1 and wide(i)
               and abs(pts[i + 1][1] - pts[i][1]) > 2 * noise]
    crossing = [i for i in range(len(pts) - 1) if threshold is not None and wide(i) and i not in plateau
                and None not in (pts[i][2], pts[i + 1][2]) and (pts[i][2] >= threshold) != (pts[i + 1][2] >= threshold)]
    crossing.sort(key=lambda i: abs(i - best))
    out = []
    for i in (plateau + crossing)[:max_points]:
        v = from_unit((pts[i][0] + pts[i + 1][0]) / 2, lo, hi, log, f)
        if all(v != t[0][f] for t in trials) and {f: v} not in out:
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
                 n_blocks: int | None = None, scores: list[float] | None = None,
                 noise: float = 0.0) -> tuple[list[tuple], list[str], list[str]]:
    """Grow each range whose best value sits at its edge and is still rising there (search.py's docstring).

    trials: the finished trials' params; scores: their scores, in the same order (without them a range grows
    whenever its best is the most extreme value tried in the edge strip). noise: the seed noise of the score.
    Returns (new space, fields extended, fields whose best value is at a hard limit and cannot grow)."""
    new, grown, stuck = [], [], []
    best_score = max(scores) if scores else None
    for f, lo, hi, log in space:
        v = best[f]
        u = to_unit(v, lo, hi, log)
        edge = EDGE_LOG if log else EDGE
        hard_lo, hard_hi = hard_limits(f, steps, n_blocks)
        units = [to_unit(t[f], lo, hi, log) for t in trials]

        def at_edge(side: str) -> bool:
            outer = (lambda w: w < u) if side == "low" else (lambda w: w > u)
            inner = (lambda w: u < w <= u + RISING) if side == "low" else (lambda w: u - RISING <= w < u)
            if not (u <= edge if side == "low" else u >= 1 - edge):
                return False
            if scores is None:
                return not any(outer(w) for w in units)
            beyond_falls = any(outer(w) and sc < best_score - 2 * noise for w, sc in zip(units, scores))
            rising = all(sc < best_score - noise for w, sc in zip(units, scores) if inner(w))
            return not beyond_falls and rising

        side = "low" if at_edge("low") else "high" if at_edge("high") else None
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
        if is_int(lo, hi, log, f):
            lo2, hi2 = int(math.floor(lo2)), int(math.ceil(hi2))
        new.append((f, lo2, hi2, log))
        grown.append(f"{f}: {side} edge, [{lo:g}, {hi:g}] -> [{lo2:g}, {hi2:g}]")
    return new, grown, stuck
