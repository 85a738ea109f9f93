"""The newer image-only methods (issue 35, item 6), each against a hand computation and in a short train() run:
TRACER's teacher (CLIPood's Beta moving average of the trajectory), DiVE's average vector loss, FLOW's sample
weights; and that a run recorded before their fields existed still resumes and is still reused."""
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infusing_kit.methods import inputs as I, regularizers as R
from infusing_kit.losses import CosineClassifier, classification_loss
from infusing_kit.models import embed_images, preprocess
from infusing_kit.run_state import Anchors
from infusing_kit.methods.teacher import extract_teacher
from infusing_kit.train import TrainConfig, train, train_step
from infusing_kit.trainconfig import with_defaults
from test_methods import CFG, _data, _score, _vlm


# ---------------------------------------------------------------------------- runs recorded before a field existed
def test_a_run_recorded_before_a_field_existed_still_resumes_and_is_still_reused(tmp_path):
    # a run recorded by an older kit lacks the fields added since (here two existing ones stand in for them): it
    # trained with them at their default, off, so it is the same configuration; with one switched on it is not
    from infusing_kit.checkpoints import RunFolder
    added = ("ldifs", "adaptive_ema")
    ours = asdict(replace(CFG, l2sp=1.0))
    old = {k: v for k, v in ours.items() if k not in added}
    assert with_defaults(old) == ours
    assert with_defaults(old) != asdict(replace(CFG, l2sp=1.0, ldifs=1.0, sampler="round_robin"))
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"visual": {}, "head": {}, "identity": {"model": "x", "config": old}}, run / "last.pt")
    defaults = asdict(TrainConfig())

    def restore(config, **kw):
        folder = RunFolder(run, resume=True)
        try:
            return folder.restore({"model": "x", "config": config}, **kw)
        finally:
            folder.close()
    assert restore(ours, config_defaults=defaults) is not None
    with pytest.raises(ValueError, match="another TrainConfig"):
        restore({**ours, "ldifs": 1.0}, config_defaults=defaults)
    with pytest.raises(ValueError, match="another TrainConfig"):  # without the defaults the missing keys differ
        restore(ours)


# ---------------------------------------------------------------------------- TRACER's teacher: CLIPood's BMA
def test_beta_weight_is_the_beta_density_at_each_steps_midpoint():
    u = 1.5 / 4  # k = 1 of 3 steps
    assert R.beta_weight(1, 3) == pytest.approx(1 / (math.pi * math.sqrt(u * (1 - u))))  # Beta(1/2, 1/2)
    assert R.beta_weight(0, 4, alpha=2.0, beta=3.0) == pytest.approx(12 * 0.1 * 0.9 ** 2)  # 1 / B(2, 3) = 12
    w = [R.beta_weight(k, 10) for k in range(11)]
    assert w[0] == pytest.approx(w[10]) and min(w) == w[5] and w[0] > 2 * w[5]  # U-shaped: the ends weigh most


def test_the_bma_is_the_beta_weighted_mean_of_theta0_and_every_update():
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(3, generator=g)
    positions = [1, 1, 2, 3, 3, 4]  # target steps done after each update (round robin: generic updates repeat k)
    thetas = [torch.randn(3, generator=g) for _ in positions]
    shared = theta0.clone()
    avg = R.WeightAverage("bma", [shared], steps=4, share=True)
    for k, t in zip(positions, thetas):
        avg.update([t], k)
    w = [R.beta_weight(0, 4)] + [R.beta_weight(k, 4) for k in positions]
    by_hand = sum(wi * ti for wi, ti in zip(w, [theta0] + thetas)) / sum(w)
    torch.testing.assert_close(avg.avg[0], by_hand)
    torch.testing.assert_close(shared, by_hand, msg="share=True keeps the average in the given tensor (a teacher's "
                                                     "parameter), not in a copy")
    again = R.WeightAverage("bma", [theta0], steps=4)
    again.load_state_dict(avg.state_dict())
    torch.testing.assert_close(again.avg[0], by_hand)
    assert again.total == pytest.approx(sum(w))


def _capture_teachers(monkeypatch) -> list:
    """The TrajectoryTeacher every train() builds, in order."""
    seen = []
    row = I.INPUTS["bma_teacher"]
    monkeypatch.setitem(I.INPUTS, "bma_teacher",
                        replace(row, build=lambda *a: seen.append(row.build(*a)) or seen[-1]))
    return seen


def test_tracer_distils_towards_the_bma_of_the_weights_it_trained_through_and_resumes_bit_identically(
        tmp_path, monkeypatch):
    teachers = _capture_teachers(monkeypatch)
    target, generic = _data(), _data(n_classes=5, seed=9)
    cfg = replace(CFG, tracer=5.0, sampler="round_robin")
    vlm = _vlm()
    trajectory = [(0, [p.detach().clone() for p in vlm.visual.parameters()])]
    keep = lambda s: trajectory.append((s.target_step, [p.detach().clone() for p in vlm.visual.parameters()]))
    _, res = train(vlm, target, cfg, tmp_path / "full", generic=generic, validate=_score, hooks=(keep,),
                   progress=False)
    logged = [h for h in res.history if h.get("domain") == "generic"]
    assert logged and all("tracer" in h and np.isfinite(h["tracer"]) and "ce" not in h for h in logged)
    # the teacher holds sum_t w_t theta_t / sum_t w_t over theta0 and the weights after every update
    w = [R.beta_weight(k, cfg.steps) for k, _ in trajectory]
    assert len(trajectory) == 1 + res.updates["target"] + res.updates["generic"]
    teacher = list(teachers[0].tower.parameters())
    for i, p in enumerate(teacher):
        by_hand = sum(wt * state[i] for wt, (_, state) in zip(w, trajectory)) / sum(w)
        torch.testing.assert_close(p, by_hand, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(p, t0) for p, t0 in zip(teacher, trajectory[0][1])), "the teacher never moved"
    # stopped at target step 4 and resumed: the same weights and the same teacher (its average is in last.pt)
    part = _vlm()
    train(part, target, cfg, tmp_path / "part", generic=generic, validate=_score, progress=False,
          hooks=(lambda s: False if s.target_step == 4 else None,))
    resumed = _vlm()
    train(resumed, target, cfg, tmp_path / "part", generic=generic, validate=_score, progress=False, resume=True)
    for a, b in zip(vlm.visual.state_dict().values(), resumed.visual.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(teachers[0].tower.parameters(), teachers[-1].tower.parameters()):
        assert torch.equal(a, b)
    # the strength moves the weights
    strong = _vlm()
    train(strong, target, replace(cfg, tracer=500.0), generic=generic, validate=_score, progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(vlm.visual.state_dict().values(),
                                                       strong.visual.state_dict().values()))


def test_tracer_refuses_lora():
    with pytest.raises(ValueError, match="tracer's teacher would average the factors"):
        TrainConfig(tracer=1.0, sampler="round_robin", lora_rank=2)


# ---------------------------------------------------------------------------- DiVE's average vector loss
def test_average_vector_loss_by_hand():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    d = [s[b] - t[b] for b in range(4)]
    mean = sum(d) / 4
    by_hand = sum(float(((db - mean) ** 2).sum()) for db in d) / 4
    assert float(R.average_vector_loss(s, t)) == pytest.approx(by_hand)
    shift = torch.tensor([0.3, -1.0, 2.0])
    assert float(R.average_vector_loss(s + shift, t)) == pytest.approx(by_hand)  # one common translation: free
    assert float(R.average_vector_loss(t + shift, t)) == pytest.approx(0.0, abs=1e-12)
    # the gradient is the same whether the batch mean is detached or not (sum_b (d_b - mean) = 0)
    a = s.clone().requires_grad_(True)
    R.average_vector_loss(a, t).backward()
    b = s.clone().requires_grad_(True)
    dd = b - t
    (dd - dd.mean(0, keepdim=True).detach()).square().sum(-1).mean().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_avl_trains_on_generic_batches_and_keeps_the_difference_vectors_together():
    target, generic = _data(), _data(n_classes=5, seed=9)
    pre = torch.from_numpy(embed_images(_vlm(), generic, progress=False))
    spread = {}
    for avl in (1e-3, 1e3):
        vlm = _vlm()
        cfg = replace(CFG, avl=avl, sampler="round_robin", eval_every=0)
        _, res = train(vlm, target, cfg, generic=generic, progress=False,
                       teacher=extract_teacher(_vlm(), generic, progress=False))
        logged = [h for h in res.history if h.get("domain") == "generic"]
        assert logged and all(np.isfinite(h["avl"]) for h in logged)
        ft = torch.from_numpy(embed_images(vlm, generic, progress=False))
        spread[avl] = float(R.average_vector_loss(ft, pre))
    assert spread[1e3] < spread[1e-3], spread


# ---------------------------------------------------------------------------- FLOW
def test_class_mean_losses_by_hand():
    g = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])  # class 2 has one sample: its own embedding is its mean
    for loss, margin in (("normface", 0.0), ("cosface", 0.2)):
        got = R.class_mean_losses(emb, labels, loss, margin, scale=16.0)
        for i in range(6):
            protos = []
            for c in range(3):
                members = [j for j in range(6) if labels[j] == c and (j != i or (labels == c).sum() == 1)]
                protos.append(F.normalize(emb[members].mean(0), dim=0))
            cos = torch.stack([emb[i] @ p for p in protos])
            logits = 16.0 * (cos - margin * F.one_hot(labels[i], 3))
            assert float(got[i]) == pytest.approx(float(-torch.log_softmax(logits, 0)[labels[i]]), rel=1e-5)


def test_flow_weights_up_weight_easy_samples_with_mean_one():
    losses = torch.tensor([0.5, 1.0, 2.0, 4.0])
    w = R.flow_weights(losses, strength=0.7)
    assert float(w.mean()) == pytest.approx(1.0)
    assert float(w[0] / w[2]) == pytest.approx(math.exp(0.7 * 1.5))  # w_i / w_j = exp(-(L_i - L_j) / tau)
    assert bool((w[:-1] > w[1:]).all())
    torch.testing.assert_close(R.flow_weights(losses, 0.0), torch.ones(4))


def test_flow_weighs_each_target_samples_cross_entropy_by_its_pretrained_loss():
    target = _data()
    vlm = _vlm()
    vlm.visual.eval()  # one forward here and one in train_step: the same numbers
    labels = torch.as_tensor(target.labels)
    cfg = replace(CFG, flow=2.0)
    # the input row: the starting tower's per-sample loss under a class-mean head
    L0 = I.INPUTS["pretrained_losses"].build(vlm, target, cfg, {"labels": labels})
    emb = torch.from_numpy(embed_images(vlm, target, progress=False))
    torch.testing.assert_close(L0, R.class_mean_losses(emb, labels, cfg.classifier, cfg.margin, cfg.scale))
    head = CosineClassifier(vlm.embed_dim, 4, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 3, 7, 12, 20])
    images = target.take(idx)
    anchors = Anchors(params=[], names=[], inputs={"pretrained_losses": L0})
    with torch.no_grad():
        got = train_step(vlm, head, images, labels[idx], idx, 0, cfg, torch.Generator().manual_seed(1), anchors)
        naive = train_step(vlm, head, images, labels[idx], idx, 0, replace(cfg, flow=0.0),
                           torch.Generator().manual_seed(1), anchors)
        e = F.normalize(vlm.visual(preprocess(vlm, images, train=True)).float(), dim=-1)
        per = classification_loss(head(e), labels[idx], reduction="none")
    w = R.flow_weights(L0, 2.0)[idx]
    torch.testing.assert_close(got["ce"], (w * per).mean())
    torch.testing.assert_close(naive["ce"], per.mean())
    assert set(got) == {"ce"}


def test_flow_trains_and_moves_the_weights():
    target = _data()
    finals = {}
    for flow in (0.0, 5.0):
        vlm = _vlm()
        _, res = train(vlm, target, replace(CFG, flow=flow), validate=_score, progress=False)
        assert all(np.isfinite(h["ce"]) for h in res.history if "ce" in h)
        finals[flow] = [p.detach().clone() for p in vlm.visual.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(finals[0.0], finals[5.0]))


# ---------------------------------------------------------------------------- FLOW and AVL resume
@pytest.mark.parametrize("change", [dict(flow=1.0), dict(avl=5.0, sampler="round_robin")], ids=["flow", "avl"])
def test_flow_and_avl_resume_bit_identically(tmp_path, change):
    target, generic = _data(), _data(n_classes=5, seed=9)
    cfg = replace(CFG, **change)
    extra = lambda: {"teacher": extract_teacher(_vlm(), generic, progress=False)} if cfg.avl else {}
    full = _vlm()
    train(full, target, cfg, tmp_path / "full", generic=generic, validate=_score, progress=False, **extra())
    part = _vlm()
    train(part, target, cfg, tmp_path / "part", generic=generic, validate=_score, progress=False,
          hooks=(lambda s: False if s.target_step == 4 else None,), **extra())
    resumed = _vlm()  # FLOW's pretrained losses are built again from the starting weights, before last.pt loads
    train(resumed, target, cfg, tmp_path / "part", generic=generic, validate=_score, progress=False, resume=True,
          **extra())
    for a, b in zip(full.visual.state_dict().values(), resumed.visual.state_dict().values()):
        assert torch.equal(a, b)
