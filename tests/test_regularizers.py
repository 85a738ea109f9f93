"""Regularizers re-derived by hand on tiny tensors; analytic gradients against autograd; the Fisher
against a per-sample-gradient loop; WiSE-FT endpoints; teacher fingerprints; the loop's switches."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infusing_kit.datasets.data import Split
from infusing_kit.models import load_model, preprocess
from infusing_kit.methods.regularizers import (embedding_distillation, ewc_penalty, fisher_diagonal, l2_zero, l2sp,
                                       lwf_distillation, Quadratic, quadratic_penalty_, relational_distillation)
from infusing_kit.methods.merges import wise_ft
from infusing_kit.methods.teacher import extract_teacher
from infusing_kit.methods.terms import TERMS_BY_NAME
from infusing_kit.train import TrainConfig, train


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"blocks.0.attn.in_proj_weight": (6, 2), "blocks.0.mlp.weight": (3, 4), "ln.bias": (5,)}
    theta0 = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    theta = {n: (t + 0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
             for n, t in theta0.items()}
    return theta, theta0


def test_l2sp_forms_by_hand_and_zero_at_init():
    theta, theta0 = _params()
    by_hand_mean = 0.0
    for n, t in theta.items():
        d2 = ((t - theta0[n]) ** 2).detach()
        if "in_proj" in n:  # q, k, v rows 0-1, 2-3, 4-5: three tensors of 4 elements
            by_hand_mean += sum(d2[i:i + 2].sum().item() / 4 for i in (0, 2, 4))
        else:
            by_hand_mean += d2.sum().item() / d2.numel()
    assert l2sp(theta, theta0, "mean", split_qkv=True).item() == pytest.approx(by_hand_mean)
    fused = sum(((t - theta0[n]) ** 2).mean().item() for n, t in theta.items())
    assert l2sp(theta, theta0, "mean", split_qkv=False).item() == pytest.approx(fused)
    by_hand_sum = sum(((t - theta0[n]) ** 2).sum().item() for n, t in theta.items()) / 2
    assert l2sp(theta, theta0, "sum").item() == pytest.approx(by_hand_sum)
    assert l2sp(theta0, theta0).item() == 0.0 and ewc_penalty(theta0, theta0, theta0).item() == 0.0
    with pytest.raises(KeyError, match="no pretrained reference"):
        l2sp({"extra": theta["ln.bias"]}, theta0)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("kind", ["l2sp_mean", "l2sp_sum", "ewc", "l2_zero"])
def test_analytic_gradient_equals_autograd(kind, foreach):
    theta, theta0 = _params(seed=1)
    fisher = {n: torch.rand(t.shape, dtype=torch.float64) for n, t in theta.items()}
    coef = 7.0
    reference = {"l2sp_mean": lambda: l2sp(theta, theta0, "mean", True), "l2sp_sum": lambda: l2sp(theta, theta0, "sum"),
                 "ewc": lambda: ewc_penalty(theta, theta0, fisher), "l2_zero": lambda: l2_zero(theta)}[kind]
    value = coef * reference()
    value.backward()
    want = {n: t.grad.clone() for n, t in theta.items()}
    for t in theta.values():
        t.grad = None
    # the weights come from train()'s own table of terms, so the production path is what is tested
    term = {"l2sp_mean": "l2sp", "l2sp_sum": "l2sp", "ewc": "ewc", "l2_zero": "l2_zero"}[kind]
    cfg = TrainConfig(l2sp_form="sum" if kind == "l2sp_sum" else "mean", l2sp_split_qkv=True)
    weights = TERMS_BY_NAME[term].weights(theta, cfg, {"fisher": fisher})
    q = Quadratic.build(weights, coef, None if kind == "l2_zero" else list(theta0.values()))
    before = {n: t.detach().clone() for n, t in theta.items()}
    assert quadratic_penalty_(list(theta.values()), q, value=False, foreach=foreach) is None  # gradient only
    for n, t in theta.items():
        torch.testing.assert_close(t.grad, want[n])
        t.grad = torch.zeros_like(t)  # second call: accumulates into an existing .grad
    got = quadratic_penalty_(list(theta.values()), q, foreach=foreach)
    assert all(torch.equal(t, before[n]) for n, t in theta.items()), "the penalty must not change the weights"
    assert float(got) == pytest.approx(value.item())
    for n, t in theta.items():
        torch.testing.assert_close(t.grad, want[n])
    # the penalty's gradient for L2-SP is coef * (theta - theta0) in the classic sum form
    if kind == "l2sp_sum":
        for n, t in theta.items():
            torch.testing.assert_close(t.grad, coef * (t - theta0[n]).detach())


def test_distillation_losses_by_hand():
    g = torch.Generator().manual_seed(2)
    s = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    t = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1)
    mse = sum(((s[b] - t[b]) ** 2).sum() / 3 for b in range(4)) / 4
    torch.testing.assert_close(embedding_distillation(s, t, "mse"), mse)
    cos = sum(1 - (s[b] @ t[b]) / s[b].norm() / t[b].norm() for b in range(4)) / 4
    torch.testing.assert_close(embedding_distillation(s, t, "cosine"), cos)
    embedding_distillation(s, t, "mse").backward()
    torch.testing.assert_close(s.grad, 2 * (s - t).detach() / (4 * 3))
    gram = sum((s[a] @ s[b] - t[a] @ t[b]) ** 2 for a in range(4) for b in range(4)) / 16
    torch.testing.assert_close(relational_distillation(s, t), gram)
    for fn in (lambda x, y: embedding_distillation(x, y, "mse"), lambda x, y: embedding_distillation(x, y, "cosine"),
               relational_distillation):
        assert abs(fn(t, t).item()) < 1e-12
    with pytest.raises(ValueError, match="mse' or 'cosine"):
        embedding_distillation(s, t, "l1")


def test_lwf_by_hand():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    T = 2.5
    kl = 0.0
    for b in range(3):
        p, q = torch.softmax(zt[b] / T, 0), torch.softmax(zs[b] / T, 0)
        kl += (p * (p.log() - q.log())).sum()
    torch.testing.assert_close(lwf_distillation(zs, zt, T), kl / 3 * T ** 2)
    assert abs(lwf_distillation(zt, zt, T).item()) < 1e-12


def test_wise_ft_endpoints_are_exact_and_midpoint_is_linear():
    a = {"w": torch.randn(3, 3), "n": torch.tensor(4)}
    b = {"w": torch.randn(3, 3), "n": torch.tensor(9)}
    assert torch.equal(wise_ft(a, b, 0.0)["w"], a["w"]) and torch.equal(wise_ft(a, b, 1.0)["w"], b["w"])
    torch.testing.assert_close(wise_ft(a, b, 0.25)["w"], 0.75 * a["w"] + 0.25 * b["w"])
    assert wise_ft(a, b, 0.5)["n"].item() == 9
    with pytest.raises(ValueError, match="alpha"):
        wise_ft(a, b, 1.5)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("toy-clip-tiny", pretrained=None)


def test_fisher_matches_per_sample_brute_force(tiny):
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 3, 1, 6, 3])
    class_emb = F.normalize(torch.randn(7, tiny.visual.output_dim, generator=g), dim=1)
    threads = torch.get_num_threads()
    fisher = fisher_diagonal(tiny, images, labels, class_emb, logit_scale=10.0)
    assert torch.get_num_threads() == threads, "fisher_diagonal must hand back the thread count it found"
    brute = {n: torch.zeros_like(p) for n, p in tiny.visual.named_parameters()}
    tiny.visual.eval()
    for i in range(5):
        tiny.visual.zero_grad()
        emb = F.normalize(tiny.visual(preprocess(tiny, images[i:i + 1])), dim=-1)
        F.log_softmax(10.0 * emb @ class_emb.T, dim=-1)[0, labels[i]].backward()
        for n, p in tiny.visual.named_parameters():
            brute[n] += p.grad ** 2 / 5
    tiny.visual.zero_grad()
    for n in brute:
        torch.testing.assert_close(fisher[n], brute[n], rtol=1e-4, atol=1e-10)
    assert sum(f.sum() for f in fisher.values()) > 0


def _domains(n=48):
    g = torch.Generator().manual_seed(5)
    target = Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), np.arange(n) % 6)
    generic = Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), np.arange(n) % 4)
    return target, generic


def test_teacher_fingerprint_mismatch_raises(tiny):
    target, generic = _domains()
    teacher = extract_teacher(tiny, generic.images, progress=False)
    cfg = TrainConfig(steps=2, batch_size=8, sampler="round_robin", distill=1.0, eval_every=0, ckpt_every=0)
    other_images = Split(generic.images.flip(0).contiguous(), generic.labels)
    with pytest.raises(ValueError, match="another model or other generic images"):
        train(tiny, target, cfg, generic=other_images, teacher=teacher, progress=False)
    torch.manual_seed(1)
    other_model = load_model("toy-clip-tiny", pretrained=None)
    with pytest.raises(ValueError, match="fingerprint"):
        train(other_model, target, cfg, generic=generic, teacher=teacher, progress=False)
    with pytest.raises(ValueError, match="need a teacher"):
        train(other_model, target, cfg, generic=generic, progress=False)


def test_combination_runs_and_l2sp_is_zero_before_the_first_update():
    torch.manual_seed(0)
    vlm = load_model("toy-clip-tiny", pretrained=None)
    target, generic = _domains()
    teacher = extract_teacher(vlm, generic.images, progress=False)
    cfg = TrainConfig(steps=4, batch_size=8, sampler="round_robin", distill=2.0, l2sp=10.0, lr_backbone=1e-3,
                      eval_every=0, ckpt_every=0, log_every=1)
    _, res = train(vlm, target, cfg, generic=generic, teacher=teacher, progress=False)
    logged = [h for h in res.history if "loss" in h]
    assert [h["domain"] for h in logged] == ["target", "generic"] * 3 + ["target"], "round robin, 4 target steps"
    assert logged[0]["l2sp"] == 0.0 and logged[1]["l2sp"] > 0
    assert "distill" in logged[1] and "ce" not in logged[1] and "distill" not in logged[0]
    # the live teacher gives the same distillation target as the pre-extracted embeddings
    torch.manual_seed(0)
    vlm2 = load_model("toy-clip-tiny", pretrained=None)
    _, res2 = train(vlm2, target, cfg, generic=generic, teacher="live", progress=False)
    assert [h["loss"] for h in res2.history if "loss" in h] == pytest.approx([h["loss"] for h in logged], rel=1e-4)


def test_lp_ft_and_freeze_blocks_leave_the_right_weights_untouched():
    target, _ = _domains()
    torch.manual_seed(0)
    vlm = load_model("toy-clip-tiny", pretrained=None)
    before = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    cfg = TrainConfig(steps=5, batch_size=8, lp_ft_steps=3, lr_backbone=1e-2, eval_every=0, ckpt_every=0)
    train(vlm, target, cfg, progress=False, hooks=(lambda s: s.target_step < 3,))  # stop after the warm-up
    assert all(torch.equal(before[k], v) for k, v in vlm.visual.state_dict().items()), "LP-FT warm-up moved the tower"
    train(vlm, target, cfg, progress=False)
    assert not all(torch.equal(before[k], v) for k, v in vlm.visual.state_dict().items()), "no update after warm-up"

    torch.manual_seed(0)
    vlm = load_model("toy-clip-tiny", pretrained=None)
    before = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    train(vlm, target, replace(cfg, lp_ft_steps=0, freeze_blocks=1), progress=False)
    after = vlm.visual.state_dict()
    frozen = [k for k in before if k.startswith(("conv1", "class_embedding", "positional_embedding", "ln_pre",
                                                  "transformer.resblocks.0."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["transformer.resblocks.1.mlp.c_fc.weight"], after["transformer.resblocks.1.mlp.c_fc.weight"])
    assert all(p.requires_grad for p in vlm.visual.parameters()), "train() must hand back the trainable set"


def test_config_refuses_regularizers_without_their_inputs():
    target, generic = _domains()
    torch.manual_seed(0)
    vlm = load_model("toy-clip-tiny", pretrained=None)
    with pytest.raises(ValueError, match="need a Fisher: train\\(..., fisher="):
        train(vlm, target, TrainConfig(steps=1, ewc=1.0, eval_every=0), progress=False)
    with pytest.raises(ValueError, match="sampler='target_only' draws none"):
        train(vlm, target, TrainConfig(steps=1, distill=1.0, eval_every=0), generic=generic, progress=False)
    with pytest.raises(ValueError, match="class_emb"):
        train(vlm, target, TrainConfig(steps=1, lwf=1.0, sampler="round_robin", eval_every=0), generic=generic,
              teacher="live", progress=False)
