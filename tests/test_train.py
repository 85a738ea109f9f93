"""The training loop on generated tensors with a tiny randomly initialised open_clip model (CPU).

Oracle for resuming: the same run without interruption (weights must be bitwise equal)."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from infusing_kit.models import trainable_parameters
from infusing_kit.train import TrainConfig, train

from conftest import TINY_TRAIN, cheap_validate, toy_target, toy_vlm

CFG = TINY_TRAIN


def test_smoke_run_learns_and_writes_files(tmp_path):
    vlm = toy_vlm()
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    cfg = replace(CFG, steps=30, eval_every=10)
    head, result = train(vlm, toy_target(), cfg, tmp_path / "run", validate=cheap_validate, progress=False)
    losses = [h["ce"] for h in result.history if "ce" in h]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), "cross-entropy did not go down"
    assert (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "last.pt").exists()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log == result.history
    assert [h["target_step"] for h in log if "val/score" in h] == [0, 10, 20, 30]
    after = vlm.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("visual.") for k in changed), "only the image tower may change"
    assert result.best_step in (10, 20, 30)


def test_only_the_image_tower_is_trainable():
    vlm = toy_vlm()
    assert trainable_parameters(vlm.model) == sum(p.numel() for p in vlm.visual.parameters())
    assert trainable_parameters(vlm.model) < sum(p.numel() for p in vlm.model.parameters())


@pytest.mark.parametrize("cfg", [CFG, replace(CFG, l2sp=50.0), replace(CFG, lora_rank=2)], ids=["naive", "l2sp", "lora"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, cfg):
    vlm_a = toy_vlm()
    head_a, _ = train(vlm_a, toy_target(), cfg, tmp_path / "a", validate=cheap_validate, progress=False)

    vlm_b = toy_vlm()
    stop_at_3 = lambda s: s.target_step < 3
    train(vlm_b, toy_target(), cfg, tmp_path / "b", validate=cheap_validate, hooks=(stop_at_3,), progress=False)
    # a fresh process loads the pretrained model again; last.pt restores the trained weights (L2-SP's anchor is
    # the pretrained model itself, whose identity the checkpoint checks)
    vlm_b = toy_vlm()
    with pytest.raises(FileExistsError, match="resume=True"):
        train(vlm_b, toy_target(), cfg, tmp_path / "b", validate=cheap_validate, progress=False)
    with pytest.raises(ValueError, match="other initial weights"):
        train(toy_vlm(seed=123), toy_target(), cfg, tmp_path / "b", validate=cheap_validate, resume=True, progress=False)
    head_b, res_b = train(vlm_b, toy_target(), cfg, tmp_path / "b", validate=cheap_validate, resume=True, progress=False)
    for (k, a), (_, b) in zip(vlm_a.visual.state_dict().items(), vlm_b.visual.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(head_a.weight, head_b.weight)
    log_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log_b if "loss" in h] == list(range(1, 7)), "log has gaps or duplicates"


def test_resume_with_another_config_is_refused(tmp_path):
    train(toy_vlm(), toy_target(), CFG, tmp_path / "r", validate=cheap_validate, hooks=(lambda s: s.target_step < 3,), progress=False)
    with pytest.raises(ValueError, match="another TrainConfig"):
        train(toy_vlm(), toy_target(), replace(CFG, lr_head=0.5), tmp_path / "r", validate=cheap_validate, resume=True, progress=False)


def test_non_finite_loss_stops_without_touching_good_checkpoints(tmp_path):
    train(toy_vlm(), toy_target(), CFG, tmp_path / "n", validate=cheap_validate, hooks=(lambda s: s.target_step < 3,), progress=False)
    best_before = (tmp_path / "n" / "best.pt").read_bytes()
    # resume from a checkpoint whose weights went NaN: the very next loss is non-finite
    ckpt = torch.load(tmp_path / "n" / "last.pt", weights_only=False)
    ckpt["visual"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ckpt["visual"].items()}
    torch.save(ckpt, tmp_path / "n" / "last.pt")
    last_before = (tmp_path / "n" / "last.pt").read_bytes()
    with pytest.raises(FloatingPointError, match="non-finite loss at step 3"):
        train(toy_vlm(), toy_target(), CFG, tmp_path / "n", validate=cheap_validate, resume=True, progress=False)
    assert (tmp_path / "n" / "best.pt").read_bytes() == best_before
    assert (tmp_path / "n" / "last.pt").read_bytes() == last_before


def test_generic_batches_without_a_loss_are_refused():
    with pytest.raises(ValueError, match="no loss term applies"):
        TrainConfig(sampler="round_robin")
    with pytest.raises(ValueError, match="sampler must be one of"):
        TrainConfig(sampler="random")


def test_unknown_select_key_is_a_clear_error():
    with pytest.raises(KeyError, match="not among the validation scores"):
        train(toy_vlm(), toy_target(), replace(CFG, select="nope"), validate=cheap_validate, progress=False)


@pytest.mark.parametrize("change, field", [
    ({"lr_backbone": -5e-3}, "lr_backbone"), ({"lr_head": 0.0}, "lr_head"), ({"l2sp": -5.0}, "l2sp"),
    ({"ewc": -1.0}, "ewc"), ({"distill": -1.0}, "distill"), ({"log_every": 0}, "log_every"), ({"steps": 0}, "steps"),
    ({"l2sp_form": "Mean"}, "l2sp_form"), ({"distill_kind": "kl"}, "distill_kind"), ({"augment": "flip"}, "augment"),
    ({"classifier": "softmax"}, "classifier"), ({"margin": 0.3}, "margin"), ({"steps": 2.5}, "steps"),
    ({"lr_backbone": float("nan")}, "lr_backbone"), ({"freeze_blocks": -2}, "freeze_blocks"),
    ({"lp_ft_steps": 6}, "lp_ft_steps"), ({"keep_pretrained": "yes"}, "keep_pretrained"),
])
def test_bad_settings_are_refused_at_construction_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        replace(CFG, **change)


def test_a_margin_needs_a_margin_loss():
    assert replace(CFG, classifier="cosface", margin=0.3).margin == 0.3
    with pytest.raises(ValueError, match="no effect with classifier='normface'"):
        replace(CFG, margin=0.3)


def test_a_run_that_gets_worse_than_the_pretrained_model_says_so(tmp_path):
    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2])  # step 0 (pretrained) is the best on validation
    with pytest.warns(UserWarning, match="below the pretrained model"):
        head, res = train(toy_vlm(), toy_target(), replace(CFG, steps=4, eval_every=1), tmp_path / "w",
                          validate=lambda vlm: {"score": next(scores)}, progress=False)
    assert res.best_step == 1 and len(res.warnings) == 1 and "below the pretrained model" in res.warnings[0]
    log = [json.loads(line) for line in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert any("warning" in h for h in log)
    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2])
    vlm = toy_vlm()
    before = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    _, res = train(vlm, toy_target(), replace(CFG, steps=4, eval_every=1, keep_pretrained=True),
                   validate=lambda vlm: {"score": next(scores)}, progress=False)
    assert res.best_step == 0 and not res.warnings
    assert all(torch.equal(before[k], v) for k, v in vlm.visual.state_dict().items()), "step 0 was kept: the pretrained tower"


def test_updates_are_counted_per_domain_and_lp_ft_skips_generic_batches_in_its_warm_up():
    from infusing_kit.methods.teacher import extract_teacher
    vlm = toy_vlm()
    generic = toy_target(n_classes=5, seed=3)
    cfg = replace(CFG, sampler="round_robin", distill=1.0, lp_ft_steps=2, eval_every=0, ckpt_every=0)
    _, res = train(vlm, toy_target(), cfg, generic=generic, teacher=extract_teacher(vlm, generic.images, progress=False),
                   progress=False)
    # round robin T, G, T, ..., T: 6 target and 5 generic batches; the backbone moves on all but the 2 warm-up
    # target steps and the generic batch drawn during the warm-up (nothing trains on it)
    assert res.updates == {"target": 6, "generic": 5, "backbone": 8}, res.updates
