"""Losses: a cosine classifier head, margin logit transforms and cross-entropy.

Margin losses are split as in insightface's arcface_torch: a tiny module owning the class weights
returns cosines; pure functions turn cosines into logits; `F.cross_entropy` finishes.

  NormFace (Wang et al. 2017):  z_j = s * cos(theta_j)
  CosFace  (Wang et al. 2018):  z_j = s * (cos(theta_j) - m [j = y])            m in cosine units
  ArcFace  (Deng et al. 2019):  z_j = s * cos(theta_j + m [j = y])              m in radians
All three coincide at m = 0. The paper uses NormFace with s = 16, m = 0.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

_COS_LIMIT = 1 - 1e-7  # keep cos strictly inside (-1, 1): acos and sqrt(1 - cos^2) have infinite slope at +-1


class CosineClassifier(nn.Module):
    """Class weights W (C, D), no bias. forward(emb (B, D)) -> cos(theta) (B, C) in [-1, 1]."""

    def __init__(self, embed_dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        bound = math.sqrt(3.0 / embed_dim)  # lecun_uniform, as the official JAX head
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim).uniform_(-bound, bound, generator=generator))

    def forward(self, emb: Tensor) -> Tensor:
        return F.normalize(emb, dim=-1) @ F.normalize(self.weight, dim=-1).T


def normface_logits(cos: Tensor, scale: float = 16.0) -> Tensor:
    """NormFace: s * cos(theta). cos: (B, C)."""
    return scale * cos


def cosface_logits(cos: Tensor, labels: Tensor, margin: float = 0.35, scale: float = 16.0) -> Tensor:
    """CosFace: s * (cos(theta_j) - m [j = y]). cos: (B, C); labels: (B,) int64; m in cosine units."""
    return scale * (cos - margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype))


def arcface_logits(cos: Tensor, labels: Tensor, margin: float = 0.5, scale: float = 16.0) -> Tensor:
    """ArcFace: s * cos(theta_y + m) on the true class, s * cos(theta_j) elsewhere; m in radians.

    cos(theta + m) = cos(theta) cos(m) - sin(theta) sin(m), with cos clamped into (-1, 1).
    Where theta + m > pi the target logit would stop decreasing with theta; there we use the
    monotonic fallback cos(theta) - m sin(m) (insightface; pytorch-metric-learning issue #537)."""
    c = cos.clamp(-_COS_LIMIT, _COS_LIMIT)
    target = c.gather(1, labels[:, None])
    sin = (1 - target ** 2).sqrt()
    shifted = target * math.cos(margin) - sin * math.sin(margin)
    shifted = torch.where(target > math.cos(math.pi - margin), shifted, target - margin * math.sin(margin))
    return scale * c.scatter(1, labels[:, None], shifted)


MarginLoss = Literal["normface", "cosface", "arcface"]


def classifier_logits(cos: Tensor, labels: Tensor, loss: MarginLoss = "normface", margin: float = 0.0,
                      scale: float = 16.0) -> Tensor:
    """Dispatch by name (a plain lookup, no substring matching)."""
    if loss == "normface":
        return normface_logits(cos, scale)
    if loss == "cosface":
        return cosface_logits(cos, labels, margin, scale)
    if loss == "arcface":
        return arcface_logits(cos, labels, margin, scale)
    raise ValueError(f"classifier loss must be 'normface', 'cosface' or 'arcface', got {loss!r}")


def classification_loss(cos: Tensor, labels: Tensor, loss: MarginLoss = "normface", margin: float = 0.0,
                        scale: float = 16.0, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the margin logits; mean over the batch (or reduction='none': (B,))."""
    return F.cross_entropy(classifier_logits(cos, labels, loss, margin, scale), labels, reduction=reduction)


def clip_contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021), used to pretrain the toy VLM.

    L = (CE(t * I T^T, diag) + CE(t * T I^T, diag)) / 2 with L2-normalised I, T (B, D) and t = exp(logit_scale)."""
    logits = logit_scale.exp() * image_emb @ text_emb.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
