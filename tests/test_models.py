"""Model loading, frozen text tower, preprocessing and embeddings, real-folder data."""
import numpy as np
import pytest
import torch
from PIL import Image

from infusing_kit.datasets.data import Split, load_image_folder
from infusing_kit.models import (embed_images, embed_texts, load_model, param_groups, preprocess, train_mode,
                                 trainable_parameters)


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return load_model("toy-clip-tiny", pretrained=None)


def test_text_tower_is_frozen_and_stays_in_eval(vlm):
    n_visual = sum(p.numel() for p in vlm.visual.parameters())
    assert trainable_parameters(vlm.model) == n_visual
    train_mode(vlm, True)
    assert vlm.visual.training
    assert all(not m.training for n, m in vlm.model.named_modules() if n and not n.startswith("visual"))
    train_mode(vlm, False)
    groups = param_groups(vlm, torch.nn.Linear(2, 2), 1e-5, 1e-3, 0.0)
    assert [g["name"] for g in groups] == ["backbone", "head"] and [g["lr"] for g in groups] == [1e-5, 1e-3]
    assert sum(p.numel() for p in groups[0]["params"]) == n_visual


def test_embeddings_are_normalised_float32(vlm):
    x = torch.randint(0, 256, (5, 3, 40, 48), dtype=torch.uint8)  # other size: resized to the model's
    e = embed_images(vlm, x, batch_size=2, progress=False)
    assert e.dtype == np.float32 and e.shape == (5, vlm.visual.output_dim)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    t = embed_texts(vlm, ["a small red plain square at the center on a dark background"] * 3, progress=False)
    assert t.shape == (3, e.shape[1]) and np.allclose(t[0], t[2])


def test_train_augmentation_is_deterministic_given_a_generator(vlm):
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for aug in ("jitter", "crop_flip"):
        a = preprocess(vlm, x, train=True, augment=aug, generator=torch.Generator().manual_seed(1))
        b = preprocess(vlm, x, train=True, augment=aug, generator=torch.Generator().manual_seed(1))
        c = preprocess(vlm, x, train=True, augment=aug, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (4, 3, 32, 32)
    assert torch.equal(preprocess(vlm, x), preprocess(vlm, x, train=True, augment="none"))
    with pytest.raises(ValueError, match="augment must be"):
        preprocess(vlm, x, train=True, augment="mixup")


def test_unknown_model_and_offline_weights_are_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown model name 'ViT-Q-99'"):
        load_model("ViT-Q-99")
    with pytest.raises(ValueError, match="pretrain.load_pretrained_toy"):
        load_model("toy-clip", pretrained="toy")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((RuntimeError, ValueError), match="not on this machine|cannot create"):
        load_model("RN50", pretrained="openai")


def test_load_image_folder_reads_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["b_class", "a_class"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            arr = rng.integers(0, 256, (30 + 7 * i, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / name / f"{i}.{'png' if i else 'jpg'}")
    (tmp_path / "a_class" / "notes.txt").write_text("not an image")
    split = load_image_folder(tmp_path, size=24)
    assert isinstance(split, Split) and split.images.shape == (6, 3, 24, 24)
    assert split.class_names == ["a_class", "b_class"] and list(split.labels) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 24)
    (tmp_path / "b_class" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image_folder(tmp_path, 24)


def _big_vision_npz(visual, path, heads: int) -> None:
    """Write a timm ViT image tower (SigLIP's, with its attention-pool head) in big_vision's checkpoint layout
    (params/img/..., kernels input-first, attention kernels split per head), as the paper's release has it."""
    t, w, p = visual.trunk, {}, "params/img/"
    a = lambda x: x.detach().numpy().copy()
    d = t.pos_embed.shape[-1]
    per_head = lambda lin: a(lin.T.reshape(d, heads, -1))            # (out, in) -> (in, heads, head_dim)
    w[p + "embedding/kernel"] = a(t.patch_embed.proj.weight.permute(2, 3, 1, 0))
    w[p + "embedding/bias"] = a(t.patch_embed.proj.bias)
    w[p + "pos_embedding"] = a(t.pos_embed)
    w[p + "Transformer/encoder_norm/scale"], w[p + "Transformer/encoder_norm/bias"] = a(t.norm.weight), a(t.norm.bias)

    def attention(prefix, q, k, v, qb, kb, vb, proj):
        for n, wt, b in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            w[f"{prefix}{n}/kernel"], w[f"{prefix}{n}/bias"] = per_head(wt), a(b.reshape(heads, -1))
        w[f"{prefix}out/kernel"] = a(proj.weight.reshape(d, heads, -1).permute(1, 2, 0))
        w[f"{prefix}out/bias"] = a(proj.bias)

    def mlp(prefix, m):
        for r, fc in enumerate((m.fc1, m.fc2)):
            w[f"{prefix}Dense_{r}/kernel"], w[f"{prefix}Dense_{r}/bias"] = a(fc.weight.T), a(fc.bias)

    for i, b in enumerate(t.blocks):
        bp = f"{p}Transformer/encoderblock_{i}/"
        w[bp + "LayerNorm_0/scale"], w[bp + "LayerNorm_0/bias"] = a(b.norm1.weight), a(b.norm1.bias)
        w[bp + "LayerNorm_1/scale"], w[bp + "LayerNorm_1/bias"] = a(b.norm2.weight), a(b.norm2.bias)
        attention(bp + "MultiHeadDotProductAttention_0/", *b.attn.qkv.weight.chunk(3), *b.attn.qkv.bias.chunk(3),
                  b.attn.proj)
        mlp(bp + "MlpBlock_0/", b.mlp)
    ap, mp = t.attn_pool, p + "MAPHead_0/"
    w[mp + "probe"] = a(ap.latent)
    attention(mp + "MultiHeadDotProductAttention_0/", ap.q.weight, *ap.kv.weight.chunk(2), ap.q.bias,
              *ap.kv.bias.chunk(2), ap.proj)
    w[mp + "LayerNorm_0/scale"], w[mp + "LayerNorm_0/bias"] = a(ap.norm.weight), a(ap.norm.bias)
    mlp(mp + "MlpBlock_0/", ap.mlp)
    np.savez(path, **w)


def test_a_big_vision_checkpoint_loads_into_the_siglip_image_tower(tmp_path):
    """The paper's SigLIP checkpoint format: a random SigLIP image tower written in big_vision's layout loads back
    into open_clip's ViT-B-16-SigLIP exactly (every tensor, and so every embedding); a file of another layout or a
    tower that is not a timm ViT is refused with the file's name."""
    import warnings
    source = load_model("ViT-B-16-SigLIP", None, image_size=32, seed=1)
    _big_vision_npz(source.visual, tmp_path / "siglip.npz", heads=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model("ViT-B-16-SigLIP", str(tmp_path / "siglip.npz"), image_size=32)
    assert any("text tower" in str(c.message) for c in caught)
    want, got = source.visual.state_dict(), loaded.visual.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # SigLIP's released weights expect inputs scaled by 0.5 / 0.5, not the OpenAI default of a tag-less model
    assert loaded.mean == loaded.std == (0.5, 0.5, 0.5) and source.mean != loaded.mean
    # a fine-tuned copy saved and loaded back is the same model: its random (seeded) text tower and normalisation
    from infusing_kit.models import save_finetuned
    seeded = load_model("ViT-B-16-SigLIP", str(tmp_path / "siglip.npz"), image_size=32, seed=7)
    save_finetuned(seeded, tmp_path / "ft.pt")
    back = load_model("ViT-B-16-SigLIP", str(tmp_path / "ft.pt"), image_size=32)
    sd, bd = seeded.model.state_dict(), back.model.state_dict()
    assert sd.keys() == bd.keys() and all(torch.equal(sd[k], bd[k]) for k in sd) and back.mean == seeded.mean
    assert not torch.equal(load_model("ViT-B-16-SigLIP", None, image_size=32, seed=2).visual.trunk.pos_embed,
                           got["trunk.pos_embed"])  # (a fresh model differs: the load did something)
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz"):
        load_model("ViT-B-16-SigLIP", str(tmp_path / "other.npz"), image_size=32)
    with pytest.raises(ValueError, match="timm ViT"):
        load_model("ViT-B-32", str(tmp_path / "siglip.npz"), image_size=32)
