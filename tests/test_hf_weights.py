"""Hugging Face `transformers` CLIP / SigLIP checkpoints as `pretrained` (infusing_kit.hfweights).

transformers is not installed: the checkpoints are written here from tiny open_clip models by a hand-written
inverse mapping (open_clip modules -> transformers names, by attribute, not by the kit's rule table), so each test
is an oracle: the loaded model must give the original's embeddings."""
import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

from infusing_kit.models import image_embedding, load_model, param_groups

CLIP, SIGLIP = "hftest-clip", "hftest-siglip"
CONFIGS = {
    CLIP: {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                           "patch_size": 8, "mlp_ratio": 2.0},
           "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 2}},
    SIGLIP: {"embed_dim": 32, "init_logit_bias": -10, "custom_text": True,
             "vision_cfg": {"image_size": 32, "timm_model_name": "hftest_vit_siglip", "timm_model_pretrained": False,
                            "timm_pool": "map", "timm_proj": "none"},
             "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 2,
                          "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}},
}
HF_CONFIG = {  # transformers' config.json fields of the two tiny models
    CLIP: {"model_type": "clip", "projection_dim": 16,
           "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "hidden_act": "gelu", "image_size": 32, "patch_size": 8},
           "text_config": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "hidden_act": "gelu", "vocab_size": 50,
                           "max_position_embeddings": 8}},
    SIGLIP: {"model_type": "siglip",
             "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
             "text_config": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 2, "vocab_size": 50, "max_position_embeddings": 8}},
}


if "hftest_vit_siglip" not in timm.list_models():
    @register_model
    def hftest_vit_siglip(pretrained=False, **kwargs):
        """A tiny SigLIP image tower: timm's vit_base_patch16_siglip_224 layout (no class token, attention pool)."""
        kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("pretrained_cfg", "cache_dir"))}
        return VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                           mlp_ratio=2.0, class_token=False, global_pool="map"), **kwargs})


@pytest.fixture(scope="module", autouse=True)
def _configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hftest-configs")
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)


def _source(name: str, seed: int = 1):
    """A random model with every tensor random (LayerNorms and biases too: a swapped one would show)."""
    vlm = load_model(name, None, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vlm.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 32 else 0.0))
    return vlm


# ---------------------------------------------------------------------------- the oracle: open_clip -> transformers
def _linear(sd, prefix, lin):
    sd[prefix + ".weight"] = lin.weight
    if lin.bias is not None:
        sd[prefix + ".bias"] = lin.bias


def _layer(sd, p, ln1, ln2, qkv_w, qkv_b, out, fc1, fc2):
    for n, w, b in zip("qkv", qkv_w.chunk(3), qkv_b.chunk(3)):
        sd[f"{p}self_attn.{n}_proj.weight"], sd[f"{p}self_attn.{n}_proj.bias"] = w, b
    _linear(sd, p + "self_attn.out_proj", out)
    _linear(sd, p + "layer_norm1", ln1)
    _linear(sd, p + "layer_norm2", ln2)
    _linear(sd, p + "mlp.fc1", fc1)
    _linear(sd, p + "mlp.fc2", fc2)


def _text(sd, text, position_ids=True):
    """open_clip's text transformer (CLIP's top level, or CustomTextCLIP's `text`) as text_model.*."""
    sd["text_model.embeddings.token_embedding.weight"] = text.token_embedding.weight
    sd["text_model.embeddings.position_embedding.weight"] = text.positional_embedding
    if position_ids:
        sd["text_model.embeddings.position_ids"] = torch.arange(text.positional_embedding.shape[0])[None]
    for i, b in enumerate(text.transformer.resblocks):
        _layer(sd, f"text_model.encoder.layers.{i}.", b.ln_1, b.ln_2, b.attn.in_proj_weight, b.attn.in_proj_bias,
               b.attn.out_proj, b.mlp.c_fc, b.mlp.c_proj)
    _linear(sd, "text_model.final_layer_norm", text.ln_final)


def hf_clip(model, text=True) -> dict:
    v, sd = model.visual, {}
    sd["vision_model.embeddings.patch_embedding.weight"] = v.conv1.weight
    sd["vision_model.embeddings.class_embedding"] = v.class_embedding
    sd["vision_model.embeddings.position_embedding.weight"] = v.positional_embedding
    sd["vision_model.embeddings.position_ids"] = torch.arange(v.positional_embedding.shape[0])[None]
    _linear(sd, "vision_model.pre_layrnorm", v.ln_pre)
    for i, b in enumerate(v.transformer.resblocks):
        _layer(sd, f"vision_model.encoder.layers.{i}.", b.ln_1, b.ln_2, b.attn.in_proj_weight, b.attn.in_proj_bias,
               b.attn.out_proj, b.mlp.c_fc, b.mlp.c_proj)
    _linear(sd, "vision_model.post_layernorm", v.ln_post)
    sd["visual_projection.weight"] = v.proj.T
    if text:
        _text(sd, model)
        sd["text_projection.weight"] = model.text_projection.T
        sd["logit_scale"] = model.logit_scale
    return {k: t.detach().clone().contiguous() for k, t in sd.items()}


def hf_siglip(model, text=True) -> dict:
    t, sd = model.visual.trunk, {}
    _linear(sd, "vision_model.embeddings.patch_embedding", t.patch_embed.proj)
    sd["vision_model.embeddings.position_embedding.weight"] = t.pos_embed[0]
    for i, b in enumerate(t.blocks):
        _layer(sd, f"vision_model.encoder.layers.{i}.", b.norm1, b.norm2, b.attn.qkv.weight, b.attn.qkv.bias,
               b.attn.proj, b.mlp.fc1, b.mlp.fc2)
    _linear(sd, "vision_model.post_layernorm", t.norm)
    ap, h = t.attn_pool, "vision_model.head."
    sd[h + "probe"] = ap.latent
    sd[h + "attention.in_proj_weight"] = torch.cat([ap.q.weight, ap.kv.weight])
    sd[h + "attention.in_proj_bias"] = torch.cat([ap.q.bias, ap.kv.bias])
    _linear(sd, h + "attention.out_proj", ap.proj)
    _linear(sd, h + "layernorm", ap.norm)
    _linear(sd, h + "mlp.fc1", ap.mlp.fc1)
    _linear(sd, h + "mlp.fc2", ap.mlp.fc2)
    if text:
        _text(sd, model.text, position_ids=False)
        _linear(sd, "text_model.head", model.text.text_projection)
        sd["logit_scale"], sd["logit_bias"] = model.logit_scale.reshape(1), model.logit_bias.reshape(1)
    return {k: x.detach().clone().contiguous() for k, x in sd.items()}


def write(sd: dict, where, layout: str, config: dict | None = None):
    """layout: folder-safetensors, folder-bin, file-safetensors, file-bin. Returns what to pass as pretrained."""
    where.mkdir(parents=True, exist_ok=True)
    folder, kind = layout.split("-")
    path = where / (("model.safetensors" if kind == "safetensors" else "pytorch_model.bin") if folder == "folder"
                    else f"weights.{'safetensors' if kind == 'safetensors' else 'bin'}")
    save_file(sd, str(path)) if kind == "safetensors" else torch.save(sd, path)
    if config is not None:
        (where / "config.json").write_text(json.dumps(config))
    return str(where) if folder == "folder" else str(path)


def assert_same(source, loaded, text=True):
    torch.manual_seed(0)
    x, tokens = torch.randn(3, 3, 32, 32), torch.randint(0, 50, (3, 8))
    with torch.no_grad():
        assert torch.allclose(image_embedding(source, x), image_embedding(loaded, x), atol=1e-6)
        assert torch.allclose(source.model.encode_image(x), loaded.model.encode_image(x), atol=1e-6)
        if text:
            assert torch.allclose(source.model.encode_text(tokens), loaded.model.encode_text(tokens), atol=1e-6)
            assert torch.equal(source.model.logit_scale, loaded.model.logit_scale)
    want, got = source.model.state_dict(), loaded.model.state_dict()
    keys = [k for k in want if text or k.startswith("visual.")]
    assert all(torch.equal(want[k], got[k]) for k in keys), [k for k in keys if not torch.equal(want[k], got[k])]


# ---------------------------------------------------------------------------- loads
@pytest.mark.parametrize("layout", ["folder-safetensors", "folder-bin", "file-safetensors", "file-bin"])
def test_a_transformers_clip_checkpoint_gives_the_original_embeddings(tmp_path, layout):
    source = _source(CLIP)
    path = write(hf_clip(source.model), tmp_path / "ckpt", layout, HF_CONFIG[CLIP] if layout[0] == "f" else None)
    loaded = load_model(CLIP, path)
    assert_same(source, loaded)
    assert loaded.pretrained == path and not any(p.requires_grad for n, p in loaded.model.named_parameters()
                                                 if not n.startswith("visual."))
    assert loaded.mean == (0.48145466, 0.4578275, 0.40821073)


@pytest.mark.parametrize("layout", ["folder-safetensors", "file-bin"])
def test_a_transformers_siglip_checkpoint_gives_the_original_embeddings(tmp_path, layout):
    source = _source(SIGLIP)
    path = write(hf_siglip(source.model), tmp_path / "ckpt", layout, HF_CONFIG[SIGLIP])
    loaded = load_model(SIGLIP, path)
    assert_same(source, loaded)
    assert torch.equal(source.model.logit_bias, loaded.model.logit_bias)
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.5, 0.5, 0.5)  # SigLIP's normalisation


def test_a_vision_only_checkpoint_loads_the_image_tower_and_warns_of_the_text_tower(tmp_path):
    source = _source(SIGLIP)
    path = write(hf_siglip(source.model, text=False), tmp_path / "ckpt", "file-safetensors")
    with pytest.warns(UserWarning, match="text tower"):
        loaded = load_model(SIGLIP, path)
    assert_same(source, loaded, text=False)
    source = _source(CLIP)
    path = write(hf_clip(source.model, text=False), tmp_path / "clip", "folder-safetensors", HF_CONFIG[CLIP])
    with pytest.warns(UserWarning, match="text tower"):
        assert_same(source, load_model(CLIP, path), text=False)


def test_preprocessor_config_sets_the_normalisation_and_a_smaller_image_size_resizes_positions(tmp_path):
    source = _source(CLIP)
    path = write(hf_clip(source.model), tmp_path / "ckpt", "folder-safetensors", HF_CONFIG[CLIP])
    (tmp_path / "ckpt" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                           "image_std": [0.4, 0.5, 0.6]}))
    loaded = load_model(CLIP, path, image_size=16)
    assert loaded.mean == (0.1, 0.2, 0.3) and loaded.std == (0.4, 0.5, 0.6) and loaded.image_size == 16
    assert loaded.visual.positional_embedding.shape == (5, 32)
    assert image_embedding(loaded, torch.randn(2, 3, 16, 16)).shape == (2, 16)


def test_the_loaded_model_trains_one_step(tmp_path):
    source = _source(CLIP)
    loaded = load_model(CLIP, write(hf_clip(source.model), tmp_path / "ckpt", "folder-bin", HF_CONFIG[CLIP]))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    opt = torch.optim.AdamW(param_groups(loaded, None, 1e-3, 1e-3, 0.0))
    loaded.visual.train()
    loss = -image_embedding(loaded, torch.randn(4, 3, 32, 32))[:, 0].sum()
    loss.backward()
    opt.step()
    after = loaded.model.state_dict()
    assert not torch.equal(before["visual.proj"], after["visual.proj"])
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("visual."))


def test_an_open_clip_safetensors_file_still_loads_as_open_clip(tmp_path):
    source = _source(CLIP)
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(tmp_path / "oc.safetensors"))
    assert_same(source, load_model(CLIP, str(tmp_path / "oc.safetensors")))


# ---------------------------------------------------------------------------- refusals
def test_a_missing_or_extra_key_is_refused_naming_the_keys_and_the_file(tmp_path):
    source = _source(CLIP)
    sd = hf_clip(source.model)
    missing = dict(sd)
    del missing["vision_model.encoder.layers.1.mlp.fc2.bias"]
    path = write(missing, tmp_path / "a", "file-safetensors")
    with pytest.raises(ValueError, match=r"a/weights\.safetensors.*vision_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_model(CLIP, path)
    extra = {**sd, "vision_model.encoder.layers.2.layer_norm1.weight": torch.ones(32)}  # a deeper model's
    path = write(extra, tmp_path / "b", "folder-bin", HF_CONFIG[CLIP])
    with pytest.raises(ValueError, match=r"b.*unexpected.*vision_model\.encoder\.layers\.2\.layer_norm1\.weight"):
        load_model(CLIP, path)
    wide = {**sd, "visual_projection.weight": torch.zeros(8, 32)}  # another projection size
    with pytest.raises(ValueError, match=r"visual_projection\.weight.*shape"):
        load_model(CLIP, write(wide, tmp_path / "c", "file-bin"))


def test_another_family_heads_or_activation_is_refused(tmp_path):
    clip_path = write(hf_clip(_source(CLIP).model), tmp_path / "clip", "folder-safetensors", HF_CONFIG[CLIP])
    with pytest.raises(ValueError, match="CLIP checkpoint.*open_clip CLIP ViT"):
        load_model(SIGLIP, clip_path)
    siglip_path = write(hf_siglip(_source(SIGLIP).model), tmp_path / "siglip", "file-safetensors")
    with pytest.raises(ValueError, match="SigLIP checkpoint.*SigLIP model"):
        load_model(CLIP, siglip_path)
    config = json.loads(json.dumps(HF_CONFIG[CLIP]))
    config["vision_config"]["hidden_act"] = "quick_gelu"
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quick_gelu"):
        load_model(CLIP, clip_path)
    config["vision_config"].update(hidden_act="gelu", num_attention_heads=4)
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="4 attention heads"):
        load_model(CLIP, clip_path)
    with pytest.raises(FileNotFoundError, match="without a transformers checkpoint"):
        load_model(CLIP, str(tmp_path / "siglip"))  # a folder with no weights of its own name


def test_a_sharded_checkpoint_loads_and_a_missing_shard_is_named(tmp_path):
    source = _source(CLIP)
    sd, folder = hf_clip(source.model), tmp_path / "sharded"
    folder.mkdir()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, part in shards.items():
        save_file({k: sd[k] for k in part}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}))
    (folder / "config.json").write_text(json.dumps(HF_CONFIG[CLIP]))
    assert_same(source, load_model(CLIP, str(folder)))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(CLIP, str(folder))
