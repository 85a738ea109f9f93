"""LoRA on the image tower: starts exactly at the pretrained model, trains only the low-rank factors, and is
merged back into plain weights whose change from the pretrained ones has rank <= r."""
from dataclasses import replace

import pytest
import torch

from infusing_kit.methods.lora import add_lora, has_lora, merge_lora
from infusing_kit.towers import layout
from infusing_kit.models import load_model, preprocess
from infusing_kit.train import TrainConfig, train
from conftest import TINY_TRAIN as CFG, cheap_validate, toy_target, toy_vlm


def test_lora_starts_at_the_pretrained_model_and_trains_only_its_factors():
    vlm = toy_vlm()
    x = preprocess(vlm, toy_target().images[:4])
    with torch.no_grad():
        before = vlm.visual(x)
    names = add_lora(vlm.visual, rank=2)
    assert names and all(n.endswith(layout(vlm.visual).lora_targets) for n in names)
    with torch.no_grad():
        assert torch.equal(vlm.visual(x), before), "B = 0 must leave the model unchanged"
    trainable = {n for n, p in vlm.visual.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(vlm.visual, rank=2)


def test_trained_lora_is_merged_into_a_low_rank_change_of_the_targets(tmp_path):
    vlm = toy_vlm()
    theta0 = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    cfg = replace(CFG, lora_rank=2, lr_backbone=1e-2, steps=6)
    train(vlm, toy_target(), cfg, tmp_path / "run", validate=cheap_validate, progress=False)
    assert not has_lora(vlm.visual)
    after = vlm.visual.state_dict()
    assert set(after) == set(theta0), "merged tower must have the original parameter names"
    assert all(p.requires_grad for p in vlm.visual.parameters()), "train() must hand back the trainable set"
    changed = [k for k in theta0 if not torch.equal(theta0[k], after[k])]
    assert changed and all(k.endswith(layout(vlm.visual).lora_targets) for k in changed), changed
    for k in changed:
        assert torch.linalg.matrix_rank((after[k] - theta0[k]).double(), rtol=1e-6) <= 2, k
    fresh = load_model("toy-clip-tiny", pretrained=None)  # a plain model loads the merged weights
    fresh.visual.load_state_dict(after)


def test_lora_does_not_mix_with_weight_space_penalties():
    with pytest.raises(ValueError, match="lora_rank"):
        TrainConfig(lora_rank=4, l2sp=1.0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(toy_vlm().visual, rank=0)
    merge_lora(toy_vlm().visual)  # nothing to merge: a no-op
