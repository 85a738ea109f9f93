"""The methods added for the reviewer's table, each against a hand computation or the published rule: SPD, the
projection, sparse updates, weight averaging, LDIFS, Lipsum-FT, the adaptive sampler, soups; and that each trains."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from infusing_kit.methods import merges, posthoc, regularizers as R
from infusing_kit.datasets.data import Split
from infusing_kit.methods.inputs import random_text_embeddings
from infusing_kit.models import load_model
from infusing_kit.methods.teacher import extract_teacher
from infusing_kit.train import TrainConfig, train

CFG = TrainConfig(steps=8, batch_size=8, lr_backbone=1e-3, lr_head=1e-2, eval_every=4, ckpt_every=4, log_every=1,
                  select="score")


def _data(n_classes=4, per_class=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    base = torch.randint(0, 256, (n_classes, 3, 32, 32), generator=g)
    images = (base[labels] + torch.randint(-20, 21, (len(labels), 3, 32, 32), generator=g)).clamp(0, 255)
    return Split(images.to(torch.uint8), labels)


def _vlm(seed=0):
    torch.manual_seed(seed)
    return load_model("toy-clip-tiny", pretrained=None)


def _score(vlm):
    return {"score": float(sum(p.double().sum() for p in vlm.visual.parameters()).item() % 1.0)}


# ---------------------------------------------------------------------------- SPD
def _adam_spd_reference(theta, theta0, grads, state, lr, strength, betas=(0.9, 0.999), eps=1e-8):
    """The published AdamSPD step (Tian et al. 2024), written out for a list of tensors: Adam's direction, then
    for each tensor with c = -<g, theta - theta0> < 0 the projection theta~ - lambda r (theta~ - theta0)."""
    out = []
    state["t"] += 1
    t = state["t"]
    for i, (p, p0, g) in enumerate(zip(theta, theta0, grads)):
        m = state["m"][i] = betas[0] * state["m"][i] + (1 - betas[0]) * g
        v = state["v"][i] = betas[1] * state["v"][i] + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        new = p - lr * m_hat / (v_hat.sqrt() + eps)
        if float(-(g * (p - p0)).sum()) < 0:
            ratio = min(max(float(((new - p0).norm() - (p - p0).norm()) / (new - p0).norm()), 0.0), 1.0)
            new = new - strength * ratio * (new - p0)
        out.append(new)
    return out


def test_spd_after_adam_equals_the_published_adamspd_rule_on_two_parameters():
    torch.manual_seed(0)
    theta0 = [torch.randn(3, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)]
    params = [torch.nn.Parameter(t + 0.1 * torch.randn_like(t)) for t in theta0]
    ref = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=0.05, betas=(0.9, 0.999), eps=1e-8)
    state = {"t": 0, "m": [torch.zeros_like(p) for p in ref], "v": [torch.zeros_like(p) for p in ref]}
    projected = []
    for step in range(6):
        # a loss that pulls one tensor away from theta0 and the other towards it: both branches of the rule occur
        loss = ((params[0] - theta0[0] - 1.0) ** 2).sum() + ((params[1] - theta0[1]) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.detach().clone() for p in params]
        before = [p.detach().clone() for p in params]
        opt.step()
        projected.append(R.spd_(params, before, grads, theta0, strength=0.7))
        ref = _adam_spd_reference(ref, theta0, grads, state, lr=0.05, strength=0.7)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)
    assert any(any(h) for h in projected) and any(not all(h) for h in projected), projected


# ---------------------------------------------------------------------------- projection, sparse, averaging
def test_projection_keeps_each_tensor_in_its_ball_and_its_direction():
    t0 = [torch.zeros(4), torch.ones(3)]
    p = [torch.tensor([3.0, 4.0, 0.0, 0.0]), torch.tensor([1.0, 1.1, 1.0])]
    R.project_(p, t0, radii=[1.0, 1.0])
    torch.testing.assert_close(p[0], torch.tensor([0.6, 0.8, 0.0, 0.0]))  # on the ball, same direction
    torch.testing.assert_close(p[1], torch.tensor([1.0, 1.1, 1.0]))       # inside: untouched


def test_top_fraction_mask_selects_exactly_the_fraction_by_score():
    scores = [torch.tensor([[0.1, 5.0], [0.3, 0.2]]), torch.tensor([4.0, 0.0, 3.0])]
    masks = R.top_fraction_mask(scores, 3 / 7)
    assert sum(int(m.sum()) for m in masks) == 3
    assert masks[0].tolist() == [[False, True], [False, False]] and masks[1].tolist() == [True, False, True]


def test_a_sparse_update_changes_only_the_masked_fraction(tmp_path):
    vlm = _vlm()
    before = {n: p.detach().clone() for n, p in vlm.visual.named_parameters()}
    cfg = replace(CFG, sparse=0.01, eval_every=0)
    train(vlm, _data(), cfg, progress=False)
    total = sum(p.numel() for p in before.values())
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in vlm.visual.named_parameters())
    k = round(0.01 * total)
    assert 0.5 * k < changed <= k, (changed, k, total)


def test_ema_average_is_the_recursion_and_uniform_is_the_mean_of_the_saved_states():
    theta0 = [torch.zeros(2)]
    ema = R.WeightAverage("ema", theta0, tau=4.0)
    uni = R.WeightAverage("uniform", theta0, every=2)
    states, a = [], torch.zeros(2)
    for step in range(1, 7):
        p = [torch.tensor([float(step), -2.0 * step])]
        ema.update(p, step)
        uni.update(p, step)
        a = 0.75 * a + 0.25 * p[0]
        if step % 2 == 0:
            states.append(p[0])
    torch.testing.assert_close(ema.avg[0], a)
    torch.testing.assert_close(uni.avg[0], torch.stack([theta0[0]] + states).mean(0))


def test_training_keeps_the_average_of_the_weights_it_validated():
    vlm = _vlm()
    theta0 = [p.detach().clone() for p in vlm.visual.parameters()]
    saved = []

    def keep(state):
        if state.step % 2 == 0:
            saved.append([p.detach().clone() for p in vlm.visual.parameters()])
    steps = iter(range(100))
    cfg = replace(CFG, average="uniform", average_every=2, eval_every=8)
    train(vlm, _data(), cfg, validate=lambda v: {"score": float(next(steps))}, hooks=(keep,), progress=False)
    mean = [torch.stack([t0] + [s[i] for s in saved]).mean(0) for i, t0 in enumerate(theta0)]
    assert len(saved) == 4
    for p, m in zip(vlm.visual.parameters(), mean):
        torch.testing.assert_close(p.detach(), m, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- LDIFS, Lipsum-FT
def test_ldifs_by_hand():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 3, 4, generator=g), torch.randn(2, 4, generator=g)]
    t = [torch.randn(2, 3, 4, generator=g), torch.randn(2, 4, generator=g)]
    by_hand = []
    for a, b in zip(s, t):
        d = a / a.norm(dim=-1, keepdim=True) - b / b.norm(dim=-1, keepdim=True)
        by_hand.append((d ** 2).sum(-1).mean())
    torch.testing.assert_close(R.ldifs(s, t), torch.stack(by_hand).mean())
    assert float(R.ldifs(s, s)) == 0.0


def test_lipsum_by_hand():
    g = torch.Generator().manual_seed(1)
    s, t, u = (F.normalize(torch.randn(n, 5, generator=g), dim=-1) for n in (3, 3, 4))
    by_hand = sum(((s[b] @ u[j]) - (t[b] @ u[j])) ** 2 for b in range(3) for j in range(4)) / 12
    torch.testing.assert_close(R.lipsum(s, t, u), by_hand)


def test_random_texts_keep_the_tokenizers_layout():
    vlm = _vlm()
    emb = random_text_embeddings(vlm, n=20, seed=3)
    assert emb.shape == (20, vlm.embed_dim) and torch.allclose(emb.norm(dim=1), torch.ones(20), atol=1e-5)
    assert torch.equal(emb, random_text_embeddings(vlm, n=20, seed=3))
    assert not torch.equal(emb, random_text_embeddings(vlm, n=20, seed=4))


@pytest.mark.parametrize("change", [dict(ldifs=1.0, sampler="round_robin"), dict(lipsum=1.0), dict(spd=0.5),
                                   dict(tpgm=0.01), dict(average="ema", average_tau=3.0),
                                   dict(distill=5.0, sampler="adaptive", adaptive_every=2)],
                         ids=["ldifs", "lipsum", "spd", "tpgm", "ema", "adaptive"])
def test_each_new_method_trains_and_resumes_bit_identically(tmp_path, change):
    target, generic = _data(), _data(n_classes=5, seed=9)
    cfg = replace(CFG, **change)

    def inputs(vlm):
        out = {}
        if cfg.distill or cfg.ldifs:
            out["teacher"] = extract_teacher(vlm, generic, progress=False)
        if cfg.lipsum:
            out["target_teacher"] = extract_teacher(vlm, target, progress=False)
            out["random_texts"] = random_text_embeddings(vlm, n=50)
        return out
    full = _vlm()
    head, res = train(full, target, cfg, tmp_path / "full", generic=generic, validate=_score, progress=False,
                      **inputs(full))
    assert res.best_step is not None and all(np.isfinite(h["loss"]) for h in res.history if "loss" in h)
    part = _vlm()
    train(part, target, cfg, tmp_path / "part", generic=generic, validate=_score, progress=False,
          hooks=(lambda s: False if s.target_step == 4 else None,), **inputs(part))
    resumed = _vlm()
    train(resumed, target, cfg, tmp_path / "part", generic=generic, validate=_score, progress=False, resume=True,
          **inputs(resumed))
    for a, b in zip(full.visual.state_dict().values(), resumed.visual.state_dict().values()):
        assert torch.equal(a, b)
    if cfg.sampler == "adaptive":
        assert res.updates["target"] == cfg.steps and res.updates["generic"] > 0
        assert any("p_generic" in h for h in res.history)


def test_adaptive_share_by_hand():
    # target loss fell to half its start, generic stayed: generic gets 1 / (0.5 + 1) of the batches
    assert R.adaptive_generic_share([1.0, 1.0], [2.0, 2.0], (2.0, 2.0), previous=0.5) == pytest.approx(2 / 3)
    assert R.adaptive_generic_share([1.0], [2.0], (2.0, 2.0), previous=0.5, ema=0.5) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert R.adaptive_generic_share([1.0], [100.0], (1.0, 1.0), previous=0.5) == 0.9  # clipped


# ---------------------------------------------------------------------------- soups and post-hoc choices
def test_greedy_soup_adds_ingredients_only_while_validation_holds():
    score = lambda s: -abs(float(s["w"]) - 2.0)  # validation prefers weights near 2
    thetas = [{"w": torch.tensor([float(v)])} for v in (1.0, 3.0, 10.0, 2.0)]
    soup, chosen = merges.greedy_soup(thetas, score)
    assert chosen == [3] and float(soup["w"]) == 2.0  # every addition to the best ingredient moves it away from 2
    soup, chosen = merges.greedy_soup(thetas[:3], score)
    assert chosen == [0, 1] and float(soup["w"]) == 2.0  # 1 and 3 average to 2; 10 would spoil it
    torch.testing.assert_close(merges.average_states(thetas)["w"], torch.tensor([4.0]))


@pytest.mark.parametrize("method", ["wise_ft", "lines", "model_stock", "soup_uniform", "soup_greedy"])
def test_post_hoc_choice_is_the_validation_maximum_and_the_tower_is_left_there(method):
    from conftest import tiny_world_and_model
    from infusing_kit.protocol.experiment import validation_fn
    world, vlm = tiny_world_and_model()
    theta0 = posthoc.states_of(vlm)
    g = torch.Generator().manual_seed(0)
    thetas = [{k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in theta0.items()}
              for _ in range(2)]
    curve, chosen = posthoc.choose(method, vlm, theta0, thetas, validation_fn(world), "generic_map@20")
    assert chosen["generic_map@20"] == max(r["generic_map@20"] for r in curve)
    again = validation_fn(world)(vlm)
    assert again["generic_map@20"] == pytest.approx(chosen["generic_map@20"])


# ---------------------------------------------------------------------------- a new term, in the documented places
def test_a_new_term_added_in_the_documented_places_trains_and_moves_the_weights(monkeypatch):
    # CONTRIBUTING.md, "Adding things": a pure function, a TrainConfig field, one TERMS row; train() does not change
    # (the row goes into terms.TERMS only: train() and TrainConfig's range check read the table when they run)
    import dataclasses

    from infusing_kit.methods import terms

    def mean_gap(student, teacher):
        """1/B sum_b ||s_b - t_b||_1: a toy loss, pulling the student's generic embeddings to the teacher's."""
        return (student - teacher).abs().sum(1).mean()

    MyConfig = dataclasses.make_dataclass("MyConfig", [("gap", float, 0.0)], bases=(TrainConfig,), frozen=True)
    row = terms.Term("gap", "generic", needs=("teacher",), loss=lambda b: mean_gap(b.student, b.teacher))
    monkeypatch.setattr(terms, "TERMS", terms.TERMS + (row,))
    target, generic = _data(), _data(n_classes=5, seed=9)
    base = dict(dataclasses.asdict(CFG), sampler="round_robin")
    with pytest.raises(ValueError, match="no loss term applies"):
        MyConfig(**base)  # gap = 0 switches the term off, so round robin has nothing to do on generic batches
    with pytest.raises(ValueError, match=r"TrainConfig.gap must be >= 0.*0 switches it off"):
        MyConfig(**base, gap=-1.0)  # a weight of TERMS is checked as every weight is
    finals = {}
    for gap in (1.0, 100.0):
        vlm = _vlm()
        cfg = MyConfig(**base, gap=gap)
        assert cfg.generic_terms() == ["gap"] and terms.needed_inputs(cfg) == {"teacher"}
        _, res = train(vlm, target, cfg, generic=generic, validate=_score, progress=False,
                       teacher=extract_teacher(_vlm(), generic, progress=False))
        logged = [h for h in res.history if h.get("domain") == "generic" and "gap" in h]
        assert logged and all(np.isfinite(h["gap"]) for h in logged), res.history[:3]
        finals[gap] = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    assert any(not torch.equal(finals[1.0][k], finals[100.0][k]) for k in finals[1.0])
