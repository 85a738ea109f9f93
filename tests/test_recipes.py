"""The extension recipes of CONTRIBUTING.md ("Where each kind of row goes"), each followed to the letter: a toy row
added in exactly the places the table names, and nothing else, runs end to end. (The term recipe:
tests/test_methods.py::test_a_new_term_added_in_the_documented_places_trains_and_moves_the_weights.)

- an input: one `Input` row of `inputs.INPUTS` (how it is built from the data, how train() makes it ready) and a
  term that names it in its `needs`; `prepare_inputs` builds it and train() hands it to the term;
- a data format: one `Format` row of `formats.FORMATS`; a config names it and the experiment runs on what it reads;
- a tower kind: one row of `towers.KINDS`; freezing, LDIFS's block features and LoRA work on the new tower;
- a post-hoc method: its pure function and one `PostHoc` row of `posthoc.METHODS`; a config names it and the
  experiment validates its candidates and keeps the best.
"""
import dataclasses
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from infusing_kit.datasets.data import Split
from infusing_kit.models import embed_images, load_model
from infusing_kit.train import TrainConfig, train

CFG = TrainConfig(steps=6, batch_size=8, lr_backbone=1e-3, lr_head=1e-2, eval_every=3, ckpt_every=0, log_every=1,
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


# ---------------------------------------------------------------------------- an input
def test_a_new_input_is_one_row_that_prepare_inputs_builds_and_train_makes_ready(monkeypatch):
    from infusing_kit.methods import inputs, terms

    made_ready = []

    def build(vlm, domains, cfg, ctx):  # the pretrained model's mean generic embedding (D,), from the data
        return torch.from_numpy(embed_images(vlm, domains.generic_train, progress=False)).mean(0)

    def ready(value, vlm, cfg, ctx):  # normalised, on the model's device, before the first step
        made_ready.append(value.shape)
        return torch.nn.functional.normalize(value.float(), dim=0).to(vlm.device)

    monkeypatch.setitem(inputs.INPUTS, "generic_centre", inputs.Input(
        "generic_centre", build, "the generic centre: train(..., generic_centre=(D,) tensor)", ready=ready))
    row = terms.Term("centre", "generic", needs=("generic_centre",),
                     loss=lambda b: (b.student.mean(0) - b.anchors.inputs["generic_centre"]).pow(2).sum())
    monkeypatch.setattr(terms, "TERMS", terms.TERMS + (row,))
    MyConfig = dataclasses.make_dataclass("MyConfig", [("centre", float, 0.0)], bases=(TrainConfig,), frozen=True)
    target, generic = _data(), _data(n_classes=5, seed=9)
    cfg = MyConfig(**dict(dataclasses.asdict(CFG), sampler="round_robin"), centre=10.0)
    with pytest.raises(ValueError, match=r"\['centre'\] need the generic centre"):  # the row's hint, by name
        train(_vlm(), target, cfg, generic=generic, validate=_score, progress=False)
    vlm = _vlm()
    given = inputs.prepare_inputs(vlm, cfg, SimpleNamespace(generic_train=generic))
    assert set(given) == {"generic_centre"} and given["generic_centre"].shape == (vlm.embed_dim,)
    _, res = train(vlm, target, cfg, generic=generic, validate=_score, progress=False, **given)
    assert made_ready == [(vlm.embed_dim,)], "train() makes a given input ready once, through its row"
    logged = [h["centre"] for h in res.history if h.get("domain") == "generic" and "centre" in h]
    assert logged and all(np.isfinite(logged)), res.history[:3]


# ---------------------------------------------------------------------------- a data format
def _read_npz(part, size):
    """A toy format: one .npz file with `images` (N, H, W, 3) uint8 and `labels` (N,)."""
    z = np.load(part["path"])
    images = torch.from_numpy(z["images"]).permute(0, 3, 1, 2).contiguous()
    if images.shape[-1] != size:
        raise ValueError(f"{part['path']}: images are {images.shape[-1]} px, the model takes {size}")
    return Split(images, z["labels"])


def test_a_new_data_format_is_one_row_that_a_config_names_and_an_experiment_runs_on(smoke_study, monkeypatch,
                                                                                      tmp_path):
    from infusing_kit.protocol import experiment, formats
    from infusing_kit.protocol.config import setup_from_config
    root = smoke_study.parents[1]
    text = (root / "configs" / "toy-naive.toml").read_text()
    old = 'val = {format = "split_file", path = "target/val.json", root = "."}'
    assert text.count(old) == 1
    text = text.replace('schedule = "smoke"', 'schedule = "smoke"\nsteps = 6\neval_every = 3')
    (root / "configs" / "recipe-files.toml").write_text(text)
    (root / "configs" / "recipe-npz.toml").write_text(text.replace(old, 'val = {format = "npz", path = "target/val.npz"}'))
    files = setup_from_config(root / "configs" / "recipe-files.toml", progress=False)
    val = files.domains.target_val
    np.savez(root / "target" / "val.npz", images=val.take(np.arange(len(val))).permute(0, 2, 3, 1).numpy(),
             labels=np.asarray(val.labels))
    with pytest.raises(ValueError, match="unknown format 'npz'"):
        setup_from_config(root / "configs" / "recipe-npz.toml", progress=False)
    monkeypatch.setitem(formats.FORMATS, "npz", formats.Format({}, _read_npz))
    npz = setup_from_config(root / "configs" / "recipe-npz.toml", progress=False)
    read, every = npz.domains.target_val, np.arange(len(val))
    assert isinstance(read, Split) and torch.equal(read.take(every), val.take(every))
    assert np.array_equal(read.labels, val.labels)
    got = experiment.run_setup(npz, tmp_path / "npz", progress=False, test=False)
    want = experiment.run_setup(files, tmp_path / "files", progress=False, test=False)
    assert got["best_step"] == want["best_step"] and got["val"] == want["val"], "the same images, the same run"


# ---------------------------------------------------------------------------- a tower kind
class _Mixer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class PatchMLP(nn.Module):
    """A kind of image tower the kit does not know: 8 x 8 patches, a stack of residual MLP blocks, a projection."""

    def __init__(self, out_dim, dim=24, depth=3):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.mixers = nn.ModuleList(_Mixer(dim) for _ in range(depth))
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.mixers:
            t = block(t)
        return self.proj(t.mean(1))


def _patch_mlp(tower):
    from infusing_kit.towers import Layout
    if not isinstance(tower, PatchMLP):
        return None
    index = lambda name: int(m.group(1)) if (m := re.match(r"mixers\.(\d+)\.", name)) else None
    return Layout("patch-mlp", ("embed.",), len(tower.mixers), ("fc1.weight", "fc2.weight"), index,
                  lambda t: list(t.mixers))


def test_a_new_tower_kind_is_one_row_and_freezing_block_features_and_lora_work_on_it(monkeypatch):
    from infusing_kit import towers
    from infusing_kit.methods.drift import block_weight_distance

    def patched(seed=0):
        vlm = _vlm(seed)
        torch.manual_seed(seed)
        vlm.model.visual = PatchMLP(vlm.embed_dim)
        return vlm
    target, generic = _data(), _data(n_classes=5, seed=9)
    cfg = dataclasses.replace(CFG, freeze_blocks=1, ldifs=1.0, sampler="round_robin")
    with pytest.raises(ValueError, match="does not know the parts of a PatchMLP"):
        train(patched(), target, cfg, generic=generic, validate=_score, progress=False)
    monkeypatch.setattr(towers, "KINDS", towers.KINDS + [_patch_mlp])
    vlm = patched()
    before = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    _, res = train(vlm, target, cfg, generic=generic, validate=_score, progress=False)
    moved = {k for k, v in vlm.visual.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and not any(k.startswith(("embed.", "mixers.0.")) for k in moved), sorted(moved)
    assert any(k.startswith("mixers.2.") for k in moved) and any(k.startswith("proj.") for k in moved)
    assert [h["ldifs"] for h in res.history if "ldifs" in h], "LDIFS read the new tower's block features"
    drift = block_weight_distance(before, vlm.visual.state_dict(), vlm.visual)
    assert list(drift) == ["stem", "block 1", "block 2", "block 3", "post"], drift
    assert drift["stem"] == drift["block 1"] == 0 and drift["block 3"] > 0 and drift["post"] > 0, drift
    vlm = patched()
    before = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    train(vlm, target, dataclasses.replace(CFG, lora_rank=2), validate=_score, progress=False)
    moved = {k for k, v in vlm.visual.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.endswith(("fc1.weight", "fc2.weight")) for k in moved), sorted(moved)


# ---------------------------------------------------------------------------- a post-hoc method
def trim(theta0: dict, theta1: dict, keep: float) -> dict:
    """theta0 + m * (theta1 - theta0), m keeping the `keep` share of each floating tensor's largest |changes|
    (TIES' trim step, on one run)."""
    out = {}
    for k, w0 in theta0.items():
        delta = theta1[k] - w0 if w0.is_floating_point() else None
        if delta is None or keep >= 1:
            out[k] = theta1[k].clone()
            continue
        n = max(1, int(keep * delta.numel()))
        cut = delta.abs().flatten().kthvalue(delta.numel() - n + 1).values
        out[k] = w0 + delta * (delta.abs() >= cut)
    return out


def test_a_new_post_hoc_method_is_a_function_and_one_row_that_a_config_names(smoke_study, monkeypatch, tmp_path):
    from infusing_kit.methods import posthoc
    from infusing_kit.protocol import experiment
    from infusing_kit.protocol.config import setup_from_config
    root = smoke_study.parents[1]
    text = (root / "configs" / "toy-naive.toml").read_text().replace(
        'schedule = "smoke"', 'schedule = "smoke"\nsteps = 6\neval_every = 3\npost_hoc = "trim"')
    (root / "configs" / "recipe-trim.toml").write_text(text)
    with pytest.raises(ValueError, match="post_hoc 'trim' is unknown"):
        setup_from_config(root / "configs" / "recipe-trim.toml", progress=False)
    row = posthoc.PostHoc(lambda theta0, thetas, tower: [({"keep": k}, trim(theta0, thetas[0], k))
                                                         for k in (0.0, 0.1, 0.5, 1.0)])
    monkeypatch.setitem(posthoc.METHODS, "trim", row)
    m = experiment.run_setup(setup_from_config(root / "configs" / "recipe-trim.toml", progress=False),
                             tmp_path / "trim", progress=False, test=False)
    assert m["post_hoc"] == "trim" and [c["keep"] for c in m["post_hoc_curve"]] == [0.0, 0.1, 0.5, 1.0]
    best = max(m["post_hoc_curve"], key=lambda c: c["mean_map@20"])
    assert m["post_hoc_chosen"] == {"keep": best["keep"]} and m["val"]["mean_map@20"] == best["mean_map@20"]
    saved = json.loads((tmp_path / "trim" / "metrics.json").read_text())
    assert saved["post_hoc_chosen"] == m["post_hoc_chosen"]


def test_a_presets_ingredients_are_its_post_hoc_rows():
    """A merge's ingredients live in its post-hoc row (`posthoc.METHODS`); a preset's `ingredients` field (which the
    built-in study snapshot records) must say the same, or a study file and the preset would merge different runs."""
    from infusing_kit.methods.posthoc import ingredients_of
    from infusing_kit.protocol.presets import PRESETS
    assert {n: p.ingredients for n, p in PRESETS.items()} == {n: ingredients_of(p.post_hoc) for n, p in PRESETS.items()}
    assert {p.ingredients for p in PRESETS.values()} == {None, "seeds", "lrs"}
