"""Post-hoc methods: after training, move the tower to a weight-space merge chosen on validation. One table,
`METHODS` (one `PostHoc` row each), and one function, `choose`.

Each row turns the pretrained tower theta0 and the fine-tuned towers thetas (the run's own first, then any other
runs it merges) into candidate state dicts, each with a label (its coefficients); `choose` validates every
candidate, keeps the one with the best validation score on `key` and leaves the tower there (as wise-ft's `_merge`:
a pure function over state dicts, the validation around it). Greedy soups are sequential: their candidates depend
on earlier scores, so that row builds its own curve.

  wise_ft       (1 - alpha) theta0 + alpha theta1, alpha on a grid                  (Wortsman et al. 2022)
  lines         theta0 + (alpha + beta (l - 1)/(L - 1)) (theta1 - theta0) per depth l (Wang et al. 2025)
  model_stock   Model Stock's per-tensor ratio, or one global ratio t on the runs' mean (Jang et al. 2024)
  soup_uniform  the mean of the runs                                                (model soups)
  soup_greedy   runs added in order of their own score while the soup's score does not fall
No test data is ever used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .drift import layer_depths
from .merges import average_states, greedy_soup, lines, model_stock, wise_ft

ALPHAS = tuple(round(float(a), 2) for a in np.linspace(0, 1, 11))
GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _wise_ft(theta0, thetas, tower):
    return [({"alpha": a}, wise_ft(theta0, thetas[0], a)) for a in ALPHAS]


def _lines(theta0, thetas, tower):
    depth, n_layers = layer_depths(tower)
    return [({"alpha": a, "beta": b}, lines(theta0, thetas[0], depth, n_layers, a, b))
            for a in GRID for b in GRID if a + b <= 1 + 1e-9]


def _model_stock(theta0, thetas, tower):
    if len(thetas) < 2:
        raise ValueError("model_stock merges at least two fine-tuned runs of the same pretrained model")
    stock, ratios = model_stock(theta0, thetas)
    mean = average_states(thetas)
    return [({"merge": "stock", "t": round(float(np.mean(list(ratios.values()))), 3)}, stock)] + \
        [({"merge": "uniform", "t": t}, wise_ft(theta0, mean, t)) for t in GRID]


def _soup_uniform(theta0, thetas, tower):
    return [({"ingredients": len(thetas)}, average_states(thetas))]


def _soup_greedy(vlm, thetas, score, key):
    rows = []

    def one(state):
        rows.append({"candidate": len(rows), **score(state)})
        return rows[-1][key]
    soup, chosen = greedy_soup(thetas, one)
    best = {"ingredients": [int(i) for i in chosen], **score(soup)}
    return rows + [best], best


@dataclass(frozen=True)
class PostHoc:
    """One post-hoc method. `candidates(theta0, thetas, tower) -> [(label, state dict)]`, every one validated; or,
    for a sequential method whose candidates depend on earlier scores, `sequential(vlm, thetas, score, key) ->
    (curve, chosen)` with score(state) -> validation scores (it leaves the tower at the chosen state).
    `ingredients`: the other fine-tuned runs it merges, which a comparison trains: "seeds" (the same method on
    another fine-tuning seed) or "lrs" (the baseline at its next-best learning rates); None: the run alone (an
    experiment config, which trains one run, refuses the others)."""
    candidates: Callable | None = None
    sequential: Callable | None = None
    ingredients: str | None = None


METHODS: dict[str, PostHoc] = {
    "wise_ft": PostHoc(_wise_ft), "lines": PostHoc(_lines),
    "model_stock": PostHoc(_model_stock, ingredients="seeds"), "soup_uniform": PostHoc(_soup_uniform, ingredients="lrs"),
    "soup_greedy": PostHoc(sequential=_soup_greedy, ingredients="lrs")}


def ingredients_of(method: str | None) -> str | None:
    """The other runs a post-hoc method merges ("seeds", "lrs"), None for one that needs none or for no method."""
    return METHODS[method].ingredients if method in METHODS else None


def several_runs(method: str | None) -> bool:
    """Whether a post-hoc method merges other runs (read from its METHODS row when asked)."""
    return ingredients_of(method) is not None


def choose(method: str, vlm, theta0: dict, thetas: list[dict], validate: Callable, key: str) -> tuple[list[dict], dict]:
    """Validate every candidate of `method` (a METHODS row) and leave vlm's tower at the best on `key`.
    Returns (the curve: one row per candidate with its label and validation scores, the chosen row)."""
    if method not in METHODS:
        raise ValueError(f"unknown post-hoc method {method!r}; choose one of {sorted(METHODS)}")
    if not thetas:
        raise ValueError(f"{method} needs at least one fine-tuned state dict")

    def score(state: dict) -> dict:
        vlm.visual.load_state_dict(state)
        return {k: float(v) for k, v in validate(vlm).items()}

    row = METHODS[method]
    if row.sequential is not None:
        return row.sequential(vlm, thetas, score, key)
    candidates = row.candidates(theta0, thetas, vlm.visual)
    curve = [{**label, **score(state)} for label, state in candidates]
    i = int(np.argmax([r[key] for r in curve]))  # the first of equal scores
    vlm.visual.load_state_dict(candidates[i][1])
    return curve, curve[i]


def states_of(vlm) -> dict:
    """A detached copy of the tower's state dict."""
    return {k: v.detach().clone() for k, v in vlm.visual.state_dict().items()}


def load_tower(path, device: str = "cpu") -> dict:
    """The fine-tuned tower's state dict from a run's model.pt."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    return ckpt["visual"]
