"""Where fine-tuning changed the image tower, block by block (docs/method.md, "Where forgetting happens").

Two views of each block of a fine-tuned tower against the pretrained one:

- weight distance: ||theta_1 - theta_0|| / ||theta_0|| over the block's parameters (stem = patch and position
  embeddings, blocks 1..B, post = final norm and projection);
- linear CKA of the block's output (its tokens' mean) on the same images, fine-tuned vs pretrained: 1 means the
  block still computes the same features up to a rotation and a scale, lower means they changed.

`layer_drift(pretrained, tuned, images)` gives both per block; `figures.drift` draws them per method.
"""
from __future__ import annotations

import numpy as np
import torch

from ..towers import layout


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same n inputs, x (n, p) and y (n, q):

        CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F),   Xc, Yc: columns centred.

    1 for representations equal up to an orthogonal transform and an isotropic scale; near 0 for unrelated ones."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"linear_cka needs (n, p) and (n, q) arrays of the same inputs, got {x.shape} and {y.shape}")
    x = x - x.mean(0)
    y = y - y.mean(0)
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / den) if den > 0 else float("nan")


def groups(tower) -> list[str]:
    """The parts of a tower in depth order: "stem", "block 1" .. "block B", "post"."""
    return ["stem"] + [f"block {i + 1}" for i in range(layout(tower).n_blocks)] + ["post"]


def group_of(name: str, tower_layout) -> str:
    """The part of the tower a parameter name belongs to (see `groups`)."""
    block = tower_layout.block_of(name)
    if block is not None:
        return f"block {block + 1}"
    return "stem" if name.startswith(tower_layout.stem) else "post"


def block_weight_distance(theta0: dict, theta1: dict, tower) -> dict[str, float]:
    """Relative distance ||theta1 - theta0|| / ||theta0|| per part of the tower (see `groups`); float tensors only."""
    lay = layout(tower)
    diff = {g: 0.0 for g in groups(tower)}
    norm = {g: 0.0 for g in groups(tower)}
    for k, a in theta0.items():
        if not a.is_floating_point():
            continue
        g = group_of(k, lay)
        diff[g] += float((theta1[k].float() - a.float()).pow(2).sum())
        norm[g] += float(a.float().pow(2).sum())
    return {g: (diff[g] ** 0.5) / (norm[g] ** 0.5) if norm[g] > 0 else 0.0 for g in diff}


def fisher_by_block(fisher: dict[str, torch.Tensor], tower) -> dict[str, dict[str, float]]:
    """What the diagonal Fisher weights, per part of the tower: its share of the total Fisher mass and its mean
    per parameter (EWC's pull on a parameter is proportional to its Fisher value)."""
    lay = layout(tower)
    mass = {g: 0.0 for g in groups(tower)}
    count = {g: 0 for g in groups(tower)}
    for k, f in fisher.items():
        g = group_of(k, lay)
        mass[g] += float(f.sum())
        count[g] += f.numel()
    total = sum(mass.values()) or 1.0
    return {g: {"share": mass[g] / total, "mean": mass[g] / count[g] if count[g] else 0.0} for g in mass}


@torch.no_grad()
def block_outputs(vlm, images, batch_size: int = 256) -> list[np.ndarray]:
    """Each block's output on `images` (uint8 (N, 3, H, W) or a data.Split), its tokens averaged: a list of
    B arrays (N, width), then the final embedding (N, D). Eval preprocessing."""
    from ..models import image_embedding, preprocess
    tower = vlm.visual
    lay = layout(tower)
    blocks = lay.blocks(tower)
    tensor = getattr(images, "images", images)
    outs: list[list[np.ndarray]] = [[] for _ in range(lay.n_blocks + 1)]
    current: dict[int, torch.Tensor] = {}

    def hook(i):
        def keep(module, inputs, output):
            current[i] = output
        return keep

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    was_training = tower.training
    tower.eval()
    try:
        for s in range(0, len(tensor), batch_size):
            x = tensor[s:s + batch_size]
            emb = image_embedding(vlm, preprocess(vlm, x))
            for i in range(lay.n_blocks):
                outs[i].append(lay.tokens(current[i], len(x)).float().mean(1).cpu().numpy())
            outs[-1].append(emb.cpu().numpy())
    finally:
        for h in handles:
            h.remove()
        tower.train(was_training)
    return [np.concatenate(o) for o in outs]


def layer_drift(pretrained, tuned, images: dict[str, object], batch_size: int = 256) -> dict:
    """Per-block drift of `tuned` from `pretrained` (two VLMs with the same tower architecture).

    images: {domain name: images} (e.g. {"generic": ..., "fine-grained": ...}). Returns
    {"groups": [...], "weight": {part: relative distance}, "cka": {domain: {part: CKA}}} where CKA is given for
    "block 1".."block B" and "post" (the final embedding)."""
    tower = pretrained.visual
    weight = block_weight_distance(tower.state_dict(), tuned.visual.state_dict(), tower)
    names = [f"block {i + 1}" for i in range(layout(tower).n_blocks)] + ["post"]
    cka = {}
    for domain, imgs in images.items():
        a = block_outputs(pretrained, imgs, batch_size)
        b = block_outputs(tuned, imgs, batch_size)
        cka[domain] = {n: linear_cka(x, y) for n, x, y in zip(names, a, b)}
    return {"groups": groups(tower), "weight": weight, "cka": cka}


def layer_depths(tower) -> tuple[dict[str, int], int]:
    """Depth l = 1..L of every state-dict entry, for LiNeS: stem 1, block i (1-based) i + 1, post B + 2 = L."""
    lay = layout(tower)
    order = {g: l + 1 for l, g in enumerate(groups(tower))}
    return {k: order[group_of(k, lay)] for k in tower.state_dict()}, len(order)
