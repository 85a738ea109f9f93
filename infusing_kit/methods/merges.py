"""Weight-space merges after training: small pure functions over state dicts (posthoc.METHODS validates them).

  WiSE-FT (Wortsman et al. 2022):  theta(alpha) = (1 - alpha) theta0 + alpha theta1
  LiNeS (Wang et al. 2025):        theta0 + (alpha + beta (l - 1)/(L - 1)) (theta1 - theta0) per depth l
  Model Stock (Jang et al. 2024):  the runs' mean pulled towards theta0 by a ratio from the angle between runs
  model soups (Wortsman et al. 2022): uniform (the mean of fine-tuned runs) and greedy (`greedy_soup`)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def wise_ft(theta0: dict[str, Tensor], theta1: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """WiSE-FT weight interpolation: (1 - alpha) theta0 + alpha theta1 (alpha 0: pretrained, 1: fine-tuned).
    Non-float entries (counters) are taken from theta1."""
    if set(theta0) != set(theta1):
        raise KeyError(f"state dicts differ: {sorted(set(theta0) ^ set(theta1))[:5]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = {}
    for k, b in theta1.items():
        a = theta0[k]
        if not b.is_floating_point():
            out[k] = b.clone()
        elif alpha == 0.0:
            out[k] = a.clone()
        elif alpha == 1.0:
            out[k] = b.clone()
        else:
            out[k] = torch.lerp(a, b, alpha)
    return out


def lines(theta0: dict[str, Tensor], theta1: dict[str, Tensor], depth: dict[str, int], n_layers: int, alpha: float,
          beta: float) -> dict[str, Tensor]:
    """LiNeS (Wang et al. 2025): the fine-tuning residual scaled by depth,

        theta(l) = theta0 + lambda(l) (theta1 - theta0),   lambda(l) = alpha + beta (l - 1) / (L - 1),

    for layers l = 1..L (depth[name] = l of each float tensor): shallow layers stay near the pretrained weights,
    deep ones keep more of the fine-tuning. beta = 0 is WiSE-FT with alpha. Non-float entries come from theta1."""
    if set(theta0) != set(theta1):
        raise KeyError(f"state dicts differ: {sorted(set(theta0) ^ set(theta1))[:5]}")
    if n_layers < 2:
        raise ValueError(f"LiNeS needs at least 2 layers, got n_layers={n_layers}")
    out = {}
    for k, b in theta1.items():
        if not b.is_floating_point():
            out[k] = b.clone()
            continue
        lam = alpha + beta * (depth[k] - 1) / (n_layers - 1)
        out[k] = theta0[k] + lam * (b - theta0[k])
    return out


def model_stock(theta0: dict[str, Tensor], thetas: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Model-Stock-style merge (Jang et al. 2024) of N fine-tuned runs from the same pretrained weights, per tensor:

        cos = mean over pairs of cos(theta_i - theta0, theta_j - theta0),   t = N cos / (1 + (N - 1) cos),
        theta = theta0 + t (mean_i theta_i - theta0),

    t clipped to [0, 1]: runs whose updates agree keep their average, runs that disagree are pulled back towards
    the pretrained weights. Returns the merged state dict and t per tensor. Non-float entries come from thetas[0]."""
    n = len(thetas)
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned state dicts, got {n}")
    out, ratios = {}, {}
    for k, a in theta0.items():
        if not a.is_floating_point():
            out[k] = thetas[0][k].clone()
            continue
        deltas = [(t[k] - a).flatten().double() for t in thetas]
        cosines = [F.cosine_similarity(deltas[i], deltas[j], dim=0, eps=1e-30)
                   for i in range(n) for j in range(i + 1, n)]
        cos = float(torch.stack(cosines).mean())
        ratio = min(max(n * cos / (1 + (n - 1) * cos), 0.0), 1.0) if cos > 0 else 0.0
        ratios[k] = ratio
        mean = torch.stack([t[k] for t in thetas]).mean(0)
        out[k] = a + ratio * (mean - a)
    return out, ratios


def average_states(thetas: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The uniform soup: the entry-wise mean of N state dicts (non-float entries from the first)."""
    if not thetas:
        raise ValueError("average_states needs at least one state dict")
    return {k: torch.stack([t[k] for t in thetas]).mean(0) if v.is_floating_point() else v.clone()
            for k, v in thetas[0].items()}


def greedy_soup(thetas: list[dict[str, Tensor]], score) -> tuple[dict[str, Tensor], list[int]]:
    """Greedy soup (Wortsman et al. 2022): ingredients sorted by their own validation score, each added to the soup
    when the average with it scores at least as well on validation. score(state dict) -> float. Returns the soup
    and the indices of its ingredients (into `thetas`)."""
    scores = [score(t) for t in thetas]
    order = sorted(range(len(thetas)), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        trial = score(average_states([thetas[j] for j in chosen + [i]]))
        if trial >= best:
            chosen.append(i)
            best = trial
    return average_states([thetas[j] for j in chosen]), chosen
