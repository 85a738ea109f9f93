"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on the image tower.

Each adapted weight W0 (out x in) becomes  W = W0 + B A,  A (r x in) small random, B (out x r) zero,
so training starts exactly at the pretrained model and the update is restricted to rank r. W0 is frozen;
only A and B train. Applied with `torch.nn.utils.parametrize` to the attention projections (fused q/k/v
and output) and the MLP linears of every transformer block (and a SigLIP attention pool's projections), as
`towers.layout` names them, so the tower's own forward runs unchanged.
`merge_lora` folds B A into W0 and removes the parametrizations: the tower then has its original
parameter names and loads into a plain model.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..towers import layout


class LowRankDelta(nn.Module):
    """W -> W + B A (the parametrization; scale alpha/r fixed to 1, i.e. alpha = r)."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.A = nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.B @ self.A).to(weight.dtype)


def add_lora(tower: nn.Module, rank: int, seed: int = 0) -> list[str]:
    """Freeze `tower` and adapt its attention and MLP weights with rank-`rank` LoRA factors (the only
    trainable parameters afterwards). Returns the adapted weights' names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if has_lora(tower):
        raise ValueError("this tower already has LoRA factors; merge_lora(tower) first")
    lay = layout(tower)
    if lay.no_lora:
        raise ValueError(f"LoRA on a {lay.kind} tower: {lay.no_lora}")
    suffixes = lay.lora_targets
    targets = [n for n, p in tower.named_parameters() if n.endswith(suffixes) and p.ndim == 2]
    if not targets:
        raise ValueError(f"no LoRA targets ({', '.join(suffixes)}) in {type(tower).__name__}")
    tower.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    for name in targets:
        module_name, _, attr = name.rpartition(".")
        module = tower.get_submodule(module_name)
        w = getattr(module, attr)
        delta = LowRankDelta(w.shape[0], w.shape[1], min(rank, *w.shape), g).to(w.device)
        parametrize.register_parametrization(module, attr, delta)
    return targets


def has_lora(tower: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in tower.modules())


@torch.no_grad()
def merge_lora(tower: nn.Module) -> None:
    """Fold every B A into its weight and remove the parametrizations, in place: the original parameter
    objects (still frozen) now hold W0 + B A."""
    for module in list(tower.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
