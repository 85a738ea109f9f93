"""Whole experiments on the built-in world: pretrained toy VLM -> fine-tune -> evaluate, as presets.

`run_experiment(preset, smoke, seed, out_dir)` writes out_dir/metrics.json:

    {"preset", "seed", "smoke", "model", "world": WorldConfig, "pretrain": PretrainConfig,
     "train": TrainConfig, "best_step", "train_seconds", "seconds",
     "pretrained": {"in_domain": {...}, "generic_image": {...}, "image_text": {...}},
     "finetuned":  {... same keys ...}}

in_domain: fine-grained test retrieval (class-disjoint from training): map@20, mmp@20, r@1.
generic_image: generic test image-image retrieval (labels = attribute combination), same keys.
image_text: held-out image-caption pairs: i2t_r@1/5/10, t2i_r@1/5/10 (captions by the frozen text tower).
Validation (checkpoint selection) uses the fine-grained val classes and the generic val images only.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import world as W
from .metrics import image_text_recall, retrieval_metrics
from .models import VLM, embed_images, embed_texts
from .pretrain import PretrainConfig, load_pretrained_toy
from .train import TrainConfig, train

K = 20


@dataclass(frozen=True)
class Preset:
    description: str
    train: TrainConfig
    smoke_train: TrainConfig


NAIVE = TrainConfig(steps=400, batch_size=128, lr_backbone=5e-4, lr_head=5e-3, eval_every=50,
                    select="fine_map@20", ckpt_every=100, augment="none")
PRESETS: dict[str, Preset] = {
    "toy-naive": Preset("image tower fine-tuned on the fine-grained domain, no regularizer; "
                        "checkpoint chosen on fine-grained validation only", NAIVE,
                        replace(NAIVE, steps=150, batch_size=128, lr_head=1e-2, eval_every=50, ckpt_every=50)),
}
SMOKE_WORLD = dict(generic_train=1000, generic_val_combos=40, generic_test_combos=60, text_pairs=150,
                   fine_train_classes=150, fine_val_classes=30, fine_test_classes=64, fine_per_class=8)


def world_config(seed: int, smoke: bool) -> W.WorldConfig:
    return W.WorldConfig(seed=seed, **(SMOKE_WORLD if smoke else {}))


def pretrain_config(seed: int, smoke: bool = False) -> PretrainConfig:
    """The toy VLM of an experiment. Smoke runs use the same (cached) model: a smaller one does not learn
    the fine-grained marks within a smoke-sized schedule (measured: toy-clip-tiny stays at chance)."""
    return replace(PretrainConfig(), seed=seed)


def evaluate(vlm: VLM, world: W.WorldSplits, progress: bool = False) -> dict[str, dict[str, float]]:
    """Test metrics on the three axes of the paper's Figure 1."""
    fine = embed_images(vlm, world.fine_test.images, progress=progress)
    generic = embed_images(vlm, world.generic_test.images, progress=progress)
    pairs = embed_images(vlm, world.text_test.images, progress=progress)
    captions = embed_texts(vlm, world.text_test.captions, progress=progress)
    pick = lambda d: {k: d[k] for k in (f"map@{K}", f"mmp@{K}", "r@1")}
    return {"in_domain": pick(retrieval_metrics(fine, world.fine_test.labels, k=K)),
            "generic_image": pick(retrieval_metrics(generic, world.generic_test.labels, k=K)),
            "image_text": image_text_recall(pairs, captions, world.text_test.caption_image)}


def validation_fn(world: W.WorldSplits):
    """validate(vlm) -> fine-grained and generic validation mAP@20 and their mean (method.md section 5)."""
    def validate(vlm: VLM) -> dict[str, float]:
        f = retrieval_metrics(embed_images(vlm, world.fine_val.images, progress=False), world.fine_val.labels, k=K, map_at_r=False)
        g = retrieval_metrics(embed_images(vlm, world.generic_val.images, progress=False), world.generic_val.labels, k=K, map_at_r=False)
        return {f"fine_map@{K}": f[f"map@{K}"], f"generic_map@{K}": g[f"map@{K}"],
                f"mean_map@{K}": (f[f"map@{K}"] + g[f"map@{K}"]) / 2}
    return validate


def run_experiment(preset: str, out_dir: str | Path, smoke: bool = False, seed: int = 0, device: str = "cpu",
                   progress: bool = True, cache_dir: str | Path | None = None) -> dict:
    """Run a preset end to end and write out_dir/metrics.json (refusing to overwrite an existing one)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out_dir)
    if (out / "metrics.json").exists():
        raise FileExistsError(f"{out / 'metrics.json'} exists; choose a new --out folder (nothing was overwritten)")
    t0 = time.time()
    p = PRESETS[preset]
    cfg = replace(p.smoke_train if smoke else p.train, seed=seed)
    wcfg, pcfg = world_config(seed, smoke), pretrain_config(seed, smoke)
    world = W.make_world(wcfg)
    vlm = load_pretrained_toy(pcfg.model, device=device, cache_dir=cache_dir, cfg=pcfg, progress=progress)
    before = evaluate(vlm, world)
    head, result = train(vlm, world.fine_train, cfg, out_dir=out / "run", generic=world.generic_train,
                         validate=validation_fn(world), progress=progress)
    after = evaluate(vlm, world)
    metrics = {"preset": preset, "description": p.description, "seed": seed, "smoke": smoke, "model": pcfg.model,
               "world": asdict(wcfg), "pretrain": asdict(pcfg), "train": asdict(cfg),
               "best_step": result.best_step, "train_seconds": round(result.seconds, 1),
               "seconds": round(time.time() - t0, 1), "pretrained": before, "finetuned": after}
    tmp = out / f"metrics.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    return metrics
