"""Any open_clip image tower: the paper's own backbone (ViT-B-16-SigLIP, a timm tower) and a CLIP ViT train
with the paper's combination, block freezing, LoRA and LP-FT + distillation through the library API (random
initialisation at 32 px: the code paths, not the accuracy). The tokenizer is not needed for any of it."""
import numpy as np
import pytest
import torch

from infusing_kit.data import Split
from infusing_kit.models import load_model
from infusing_kit.regularizers import quadratic_weights
from infusing_kit.teacher import extract_teacher
from infusing_kit.towers import fused_parts, layout
from infusing_kit.train import TrainConfig, train

METHODS = {"paper": dict(l2sp=10.0, distill=1.0, sampler="round_robin"), "freeze": dict(freeze_blocks=2),
           "lora": dict(lora_rank=2), "lp-ft + distill": dict(lp_ft_steps=1, distill=1.0, sampler="round_robin")}


@pytest.fixture(scope="module", params=["ViT-B-16-SigLIP", "ViT-B-32"])
def tower(request):
    torch.manual_seed(0)
    return load_model(request.param, None, image_size=32)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_clip_and_siglip_towers(tower, method):
    g = torch.Generator().manual_seed(0)
    target = Split(torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8), np.repeat(np.arange(4), 4))
    generic = Split(torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8), np.arange(12))
    before = {k: v.clone() for k, v in tower.visual.state_dict().items()}
    cfg = TrainConfig(steps=2, batch_size=4, eval_every=0, ckpt_every=0, lr_backbone=1e-4, **METHODS[method])
    teacher = extract_teacher(tower, generic, progress=False) if cfg.generic_terms() else None
    head, res = train(tower, target, cfg, generic=generic, teacher=teacher, progress=False)
    after = tower.visual.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    tower.visual.load_state_dict(before)
    parts = layout(tower.visual)
    assert head.weight.shape == (4, tower.embed_dim) and changed
    if method == "freeze":
        assert not any(parts.frozen_by(k, 2) for k in changed), "a frozen tensor moved"
        assert any(parts.block_of(k) == 2 for k in changed)
    if method == "lora":
        assert all(k.endswith(parts.lora_targets) for k in changed), sorted(changed - {k for k in changed
                                                                                    if k.endswith(parts.lora_targets)})
    if method == "lp-ft + distill":
        assert res.updates == {"target": 2, "generic": 1, "backbone": 2}, res.updates


def test_fused_projections_count_as_their_parts():
    assert fused_parts("transformer.resblocks.0.attn.in_proj_weight") == 3
    assert fused_parts("trunk.blocks.3.attn.qkv.weight") == 3
    assert fused_parts("trunk.attn_pool.kv.bias") == 2        # SigLIP's attention pool: k and v fused
    assert fused_parts("trunk.attn_pool.q.weight") == 1
    w = torch.zeros(6, 4)
    got = quadratic_weights({"trunk.attn_pool.kv.weight": w, "trunk.attn_pool.q.weight": w}, "l2sp_mean")
    assert got == [2 * 2 / 24, 2 / 24]


def test_an_unknown_tower_is_a_clear_error():
    with pytest.raises(ValueError, match="does not know the parts"):
        layout(torch.nn.Linear(2, 2))
