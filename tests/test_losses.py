"""Losses re-derived by hand (oracle: explicit loops / math.acos, and F.log_softmax), as in
pytorch-metric-learning's test_cosface_loss.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from infusing_kit.losses import (CosineClassifier, arcface_logits, classification_loss, clip_contrastive_loss,
                                 cosface_logits, normface_logits)


def _cos(b=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, generator=g, dtype=torch.float64) * 1.8 - 0.9, torch.randint(0, c, (b,), generator=g)


def test_margins_coincide_at_zero():
    cos, y = _cos()
    n = normface_logits(cos, 16.0)
    torch.testing.assert_close(cosface_logits(cos, y, 0.0, 16.0), n)
    torch.testing.assert_close(arcface_logits(cos, y, 0.0, 16.0), n)


def test_cosface_by_hand():
    cos, y = _cos(seed=1)
    got = cosface_logits(cos, y, margin=0.35, scale=10.0)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            want = 10.0 * (cos[i, j] - (0.35 if j == y[i] else 0.0))
            assert got[i, j].item() == pytest.approx(want.item())


def test_arcface_by_hand_away_from_the_fallback():
    cos, y = _cos(seed=2)
    m = 0.3
    got = arcface_logits(cos, y, margin=m, scale=8.0)
    for i in range(cos.shape[0]):
        for j in range(cos.shape[1]):
            c = cos[i, j].item()
            want = 8.0 * (math.cos(math.acos(c) + m) if j == y[i] else c)
            assert got[i, j].item() == pytest.approx(want, abs=1e-9)


def test_arcface_fallback_is_monotonic_and_finite_at_the_edges():
    m = 0.5
    cos = torch.linspace(-1, 1, 401, dtype=torch.float64)[:, None].requires_grad_(True)
    y = torch.zeros(401, dtype=torch.long)
    z = arcface_logits(cos, y, m, 1.0)[:, 0]
    assert bool((z[1:] >= z[:-1] - 1e-12).all()), "target logit must not decrease as cos grows"
    z.sum().backward()
    assert torch.isfinite(cos.grad).all()
    # in the fallback region theta + m > pi: cos - m sin(m)
    c = -0.99
    assert arcface_logits(torch.tensor([[c]], dtype=torch.float64), torch.tensor([0]), m, 1.0).item() == \
        pytest.approx(c - m * math.sin(m))


def test_classification_loss_is_cross_entropy_of_scaled_logits():
    cos, y = _cos(seed=3)
    want = -(F.log_softmax(16 * cos, dim=1)[torch.arange(len(y)), y]).mean()
    torch.testing.assert_close(classification_loss(cos, y, "normface", 0.0, 16.0), want)
    per = classification_loss(cos, y, "cosface", 0.2, 16.0, reduction="none")
    assert per.shape == (len(y),)
    with pytest.raises(ValueError, match="normface"):
        classification_loss(cos, y, "sphereface")


def test_cosine_classifier_returns_cosines():
    head = CosineClassifier(8, 4, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(3, 8)
    cos = head(emb)
    for i in range(3):
        for c in range(4):
            w = head.weight[c]
            assert cos[i, c].item() == pytest.approx((emb[i] @ w / emb[i].norm() / w.norm()).item(), abs=1e-6)
    assert not any(n == "bias" for n, _ in head.named_parameters())


def test_clip_contrastive_loss_by_hand():
    g = torch.Generator().manual_seed(4)
    a = F.normalize(torch.randn(5, 6, generator=g), dim=1)
    b = F.normalize(torch.randn(5, 6, generator=g), dim=1)
    t = torch.tensor(math.log(10.0))
    logits = 10.0 * a @ b.T
    i2t = -sum(F.log_softmax(logits[i], 0)[i] for i in range(5)) / 5
    t2i = -sum(F.log_softmax(logits[:, i], 0)[i] for i in range(5)) / 5
    torch.testing.assert_close(clip_contrastive_loss(a, b, t), (i2t + t2i) / 2)
