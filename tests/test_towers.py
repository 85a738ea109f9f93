"""Every common open_clip image tower: the paper's own backbone (ViT-B-16-SigLIP, a timm ViT), a CLIP ViT, a ConvNeXt
(a timm tower) and a ModifiedResNet train with every method of the kit through the library API (random
initialisation at 32 px: the code paths, not the accuracy), and each tower's layout names its stem, blocks and head.
The tokenizer is not needed for any of it (text-using inputs are given as tensors)."""
import numpy as np
import pytest
import torch

from infusing_kit.datasets.data import Split
from infusing_kit.models import load_model
from infusing_kit.methods.regularizers import quadratic_weights
from infusing_kit.methods.teacher import extract_teacher
from infusing_kit.methods.terms import needed_inputs
from infusing_kit.towers import fused_parts, layout
from infusing_kit.train import TrainConfig, train

METHODS = {"paper": dict(l2sp=10.0, distill=1.0, sampler="round_robin"), "freeze": dict(freeze_blocks=2),
           "lora": dict(lora_rank=2), "lp-ft + distill": dict(lp_ft_steps=1, distill=1.0, sampler="round_robin")}


TOWERS = ["ViT-B-16-SigLIP", "ViT-B-32", "convnext_tiny", "RN50"]


@pytest.fixture(scope="module", params=TOWERS)
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
    if method == "lora" and layout(tower.visual).kind == "open_clip-resnet":
        with pytest.raises(ValueError, match="LoRA on a open_clip-resnet tower"):
            train(tower, target, cfg, progress=False)
        return
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


EVERY = {  # one row per method of presets.PRESETS (post-hoc ones below): its TrainConfig changes
    "naive": {}, "l2sp": dict(l2sp=10.0), "l2sp-sum": dict(l2sp=1.0, l2sp_form="sum"), "ewc": dict(ewc=10.0),
    "l2-zero": dict(l2_zero=0.1), "distill": dict(distill=1.0, sampler="round_robin"),
    "distill-cos": dict(distill=1.0, distill_kind="cosine", sampler="round_robin"),
    "relational": dict(relational=1.0, sampler="round_robin"), "ldifs": dict(ldifs=1.0, sampler="round_robin"),
    "lwf": dict(lwf=1.0, sampler="round_robin"), "lipsum": dict(lipsum=1.0, lipsum_texts=4),
    "spd": dict(spd=0.5), "tpgm": dict(tpgm=0.01), "sparse": dict(sparse=0.01), "ema": dict(average="ema", average_tau=2.0),
    "weight-avg": dict(average="uniform", average_every=1), "balanced": dict(distill=1.0, sampler="balanced"),
    "proportional": dict(distill=1.0, sampler="proportional"), "adaptive": dict(distill=1.0, sampler="adaptive",
                                                                              adaptive_every=1),
    "lp-ft": dict(lp_ft_steps=1), "freeze": dict(freeze_blocks=1), "lora": dict(lora_rank=2),
    "tracer": dict(tracer=1.0, sampler="round_robin"), "dive-avl": dict(avl=1.0, sampler="round_robin"),
    "flow": dict(flow=1.0),
}


@pytest.mark.slow
def test_every_method_trains_on_every_tower_kind(tower):
    from infusing_kit.methods import posthoc
    from infusing_kit.datasets.data import Split
    from infusing_kit.protocol.experiment import Domains, validation_fn
    from infusing_kit.methods.regularizers import fisher_diagonal
    g = torch.Generator().manual_seed(1)
    target = Split(torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8), np.repeat(np.arange(4), 4))
    generic = Split(torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8), np.arange(12) % 3)
    before = {k: v.clone() for k, v in tower.visual.state_dict().items()}
    d = tower.embed_dim
    inputs = {"teacher": extract_teacher(tower, generic, progress=False),
              "target_teacher": extract_teacher(tower, target, progress=False),
              "class_emb": torch.nn.functional.normalize(torch.randn(3, d, generator=g), dim=-1),
              "random_texts": torch.nn.functional.normalize(torch.randn(20, d, generator=g), dim=-1)}
    inputs["fisher"] = fisher_diagonal(tower, generic.rows(0, 4), generic.labels[:4], inputs["class_emb"])
    kind = layout(tower.visual).kind
    trained = {}
    for name, change in EVERY.items():
        cfg = TrainConfig(steps=2, batch_size=4, eval_every=1, ckpt_every=0, lr_backbone=1e-4, select="score", **change)
        if name == "lora" and kind == "open_clip-resnet":
            with pytest.raises(ValueError, match="LoRA on a open_clip-resnet tower: ModifiedResNet's blocks are conv"):
                train(tower, target, cfg, generic=generic, progress=False)
            continue
        need = {k: v for k, v in inputs.items() if k in needed_inputs(cfg)}
        calls = iter(range(10))  # the score rises with each validation: the last step is kept (LP-FT's is its first backbone step)
        head, res = train(tower, target, cfg, generic=generic, progress=False,
                          validate=lambda v: {"score": float(next(calls))}, **need)
        after = tower.visual.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{name} changed nothing on {kind}"
        trained[name] = {k: v.clone() for k, v in after.items()}
        tower.visual.load_state_dict(before)
    val = validation_fn(Domains(target, target, target, generic, generic, generic, generic))
    for method in posthoc.METHODS:
        thetas = [trained["naive"], trained["l2sp"]][: 2 if method in ("model_stock", "soup_uniform", "soup_greedy") else 1]
        curve, chosen = posthoc.choose(method, tower, before, thetas, val, "mean_map@20")
        assert chosen["mean_map@20"] == max(r["mean_map@20"] for r in curve), (method, kind)
    tower.visual.load_state_dict(before)


def test_each_tower_kind_names_its_stem_blocks_and_head(tower):
    lay = layout(tower.visual)
    names = [n for n, _ in tower.visual.named_parameters()]
    blocks = {lay.block_of(n) for n in names} - {None}
    assert blocks == set(range(lay.n_blocks)) and lay.n_blocks == len(lay.blocks(tower.visual))
    assert any(n.startswith(lay.stem) for n in names), "no stem parameter"
    assert any(lay.block_of(n) is None and not n.startswith(lay.stem) for n in names), "no head parameter"
    from infusing_kit.methods.drift import block_outputs
    g = torch.Generator().manual_seed(0)
    outs = block_outputs(tower, torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8))
    assert len(outs) == lay.n_blocks + 1 and all(o.shape[0] == 3 for o in outs)


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
