"""The toy VLM: a small open_clip CLIP pretrained contrastively by the kit on the built-in world.

It stands in for CLIP/SigLIP when no weights can be downloaded: after a few minutes on two CPU
cores it knows the generic world (caption retrieval, attribute-combination retrieval) and knows
nothing of the fine-grained marks, which captions never mention.

`load_pretrained_toy(name)` returns the cached model, pretraining it first when the cache has no
entry for its exact `PretrainConfig` (the cache key is a hash of the config and the world version;
delete the file, or the cache folder, to rebuild). Cache folder: $INFUSING_KIT_CACHE, else
~/.cache/infusing_kit.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world
from .checkpoints import atomic_save
from .losses import clip_contrastive_loss
from .models import CONFIG_DIR, VLM, freeze_text_tower, load_model, preprocess, progress_bar

WORLD_VERSION = 1  # bump when the world's rendering changes, so cached models are rebuilt


@dataclass(frozen=True)
class PretrainConfig:
    model: str = "toy-clip"      # a config in infusing_kit/model_configs
    seed: int = 0
    steps: int = 300             # fresh image-caption batches (77k images at the default size)
    batch_size: int = 256
    lr: float = 2e-3             # AdamW, linear warm-up then cosine decay to 0
    warmup: int = 40
    weight_decay: float = 0.05


SMOKE_PRETRAIN = PretrainConfig(model="toy-clip-tiny", steps=400, batch_size=128, lr=3e-3, warmup=20)


def cache_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("INFUSING_KIT_CACHE") or Path.home() / ".cache" / "infusing_kit")


def cache_path(cfg: PretrainConfig, root: str | Path | None = None) -> Path:
    """The cache file of a pretrained toy VLM: keyed by the config, the architecture file and the world version."""
    arch = (CONFIG_DIR / f"{cfg.model}.json").read_text() if (CONFIG_DIR / f"{cfg.model}.json").exists() else ""
    key = hashlib.sha256(json.dumps({**asdict(cfg), "world": WORLD_VERSION, "arch": json.loads(arch or "{}")},
                                    sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir(root) / f"{cfg.model}-pretrained-{key}.pt"


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 0 (a pure function of the step)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def pretrain(cfg: PretrainConfig = PretrainConfig(), device: str | torch.device = "cpu",
             progress: bool = True) -> tuple[VLM, dict]:
    """Contrastive (CLIP) pretraining of a fresh toy model on fresh world batches. Deterministic from cfg.seed."""
    torch.manual_seed(cfg.seed)
    vlm = load_model(cfg.model, pretrained=None, device=device)
    for p in vlm.model.parameters():
        p.requires_grad_(True)
    decay = [p for n, p in vlm.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in vlm.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    stream = world.caption_stream(cfg.seed, cfg.batch_size, vlm.image_size)
    vlm.model.train()
    t0, losses = time.time(), []
    for step in (bar := progress_bar(range(cfg.steps), progress, desc=f"pretrain {cfg.model}")):
        images, texts = next(stream)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        img = F.normalize(vlm.model.encode_image(preprocess(vlm, images)), dim=-1)
        txt = F.normalize(vlm.model.encode_text(vlm.tokenizer(texts).to(vlm.device)), dim=-1)
        loss = clip_contrastive_loss(img, txt, vlm.model.logit_scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"toy pretraining diverged at step {step} (loss {loss.item()}); lower PretrainConfig.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            vlm.model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    freeze_text_tower(vlm)
    return vlm, {"config": asdict(cfg), "seconds": time.time() - t0, "final_loss": sum(losses[-20:]) / len(losses[-20:])}


def load_pretrained_toy(name: str = "toy-clip", device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                        cfg: PretrainConfig | None = None, progress: bool = True) -> VLM:
    """The pretrained toy VLM for `name`, from the cache or pretrained now (and cached)."""
    if cfg is None:
        cfg = SMOKE_PRETRAIN if name == SMOKE_PRETRAIN.model else replace(PretrainConfig(), model=name)
    path = cache_path(cfg, cache_dir)
    if path.exists():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"cached toy model {path} cannot be read ({e}); delete it to pretrain again") from e
        vlm = load_model(cfg.model, pretrained=None, device="cpu")
        vlm.model.load_state_dict(ckpt["state_dict"])
        vlm.model.to(device)
        freeze_text_tower(vlm)
    else:
        vlm, info = pretrain(cfg, device=device, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)  # atomic: a reader never sees half a file
        atomic_save({"state_dict": {k: v.cpu() for k, v in vlm.model.state_dict().items()}, "info": info}, path)
    vlm.pretrained = f"toy:{path.name}"
    return vlm
