"""The toy VLM: a small open_clip CLIP pretrained contrastively by the kit on the built-in world.

It stands in for CLIP/SigLIP when no weights can be downloaded: it knows the generic world (caption retrieval,
attribute-combination retrieval), the shapes and colours of the near world's fine-grained classes but only
partly their shades, and nothing of the far world's marks, which captions never mention.

Same config, same bits: pretraining runs on one CPU thread whatever the process's thread count (float sums in
matrix products are ordered differently with 1 and 2 threads, so a 2-thread and a 1-thread process pretrained
different models; measured). `fingerprint(vlm)` is the hash every run records of the weights it started from.

`load_pretrained_toy(name)` returns the model for a `PretrainConfig`: from the cache, else from the weights the
kit ships for the default configs (infusing_kit/weights, written by `python -m infusing_kit pretrain`; the near
world's model takes 17 minutes to pretrain on one core), else pretrained now and cached. The cache key is a hash
of the config, the architecture and the world version; delete the file, or the cache folder, to rebuild. Cache
folder: $INFUSING_KIT_CACHE, else ~/.cache/infusing_kit.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .checkpoints import atomic_save
from .losses import clip_contrastive_loss
from .models import CONFIG_DIR, VLM, freeze_text_tower, load_model, preprocess, progress_bar

WORLD_VERSION = 1  # bump when the generic world's rendering changes, so cached models are rebuilt
PRETRAIN_VERSION = 2  # 2: pretraining on one thread (version 1 models depended on the thread count)
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class PretrainConfig:
    model: str = "toy-clip"      # a config in infusing_kit/model_configs
    seed: int = 0
    steps: int = 1000            # fresh image-caption batches (256k images at the default size)
    batch_size: int = 256
    lr: float = 2e-3             # AdamW, linear warm-up then cosine decay to 0
    warmup: int = 40
    weight_decay: float = 0.05


FAR_PRETRAIN = PretrainConfig(steps=300)   # the far world's toy VLM (results/toy-*-v2.*): a shorter pretraining
SMOKE_PRETRAIN = PretrainConfig(model="toy-clip-tiny", steps=400, batch_size=128, lr=3e-3, warmup=20)


@contextlib.contextmanager
def one_thread():
    """Run the body on one CPU thread (torch's intra-op pool), then restore the count: results that do not depend
    on how many threads the process has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fingerprint(vlm: VLM) -> str:
    """sha256 (16 hex digits) over the whole model's state (both towers): what a run records of its starting weights."""
    from .checkpoints import tower_fingerprint
    return tower_fingerprint(vlm.model)


def cache_dir(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("INFUSING_KIT_CACHE") or Path.home() / ".cache" / "infusing_kit")


def cache_path(cfg: PretrainConfig, root: str | Path | None = None) -> Path:
    """The cache file of a pretrained toy VLM: keyed by the config, the architecture file and the world version."""
    arch = (CONFIG_DIR / f"{cfg.model}.json").read_text() if (CONFIG_DIR / f"{cfg.model}.json").exists() else ""
    key = hashlib.sha256(json.dumps({**asdict(cfg), "world": WORLD_VERSION, "arch": json.loads(arch or "{}"),
                                     "pretrain": PRETRAIN_VERSION}, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir(root) / f"{cfg.model}-pretrained-{key}.pt"


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 0 (a pure function of the step)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def pretrain(cfg: PretrainConfig = PretrainConfig(), device: str | torch.device = "cpu",
             progress: bool = True) -> tuple[VLM, dict]:
    """Contrastive (CLIP) pretraining of a fresh toy model on fresh world batches. Deterministic from cfg.seed, on one
    CPU thread whatever the process's thread count (the same bits from any process; `one_thread`)."""
    with one_thread():
        return _pretrain(cfg, device, progress)


def _pretrain(cfg: PretrainConfig, device, progress: bool) -> tuple[VLM, dict]:
    torch.manual_seed(cfg.seed)
    vlm = load_model(cfg.model, pretrained=None, device=device)
    for p in vlm.model.parameters():
        p.requires_grad_(True)
    decay = [p for n, p in vlm.model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in vlm.model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    stream = caption_stream(cfg.seed, cfg.batch_size, vlm.image_size)
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
    return vlm, {"config": asdict(cfg), "seconds": time.time() - t0, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                 "threads": 1, "device": str(device), "torch": str(torch.__version__)}


def load_pretrained_toy(name: str = "toy-clip", device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
                        cfg: PretrainConfig | None = None, progress: bool = True) -> VLM:
    """The pretrained toy VLM for `name`, from the cache or pretrained now (and cached)."""
    if cfg is None:
        cfg = SMOKE_PRETRAIN if name == SMOKE_PRETRAIN.model else replace(PretrainConfig(), model=name)
    path = cache_path(cfg, cache_dir)
    shipped = shipped_path(cfg)
    if path.exists() or shipped.exists():
        try:
            state = (torch.load(path, map_location="cpu", weights_only=True)["state_dict"] if path.exists() else
                     read_weights(shipped))
        except Exception as e:
            bad = path if path.exists() else shipped
            raise RuntimeError(f"toy model weights {bad} cannot be read ({e}); delete it to pretrain again") from e
        vlm = load_model(cfg.model, pretrained=None, device="cpu")
        vlm.model.load_state_dict(state)
        vlm.model.to(device)
        freeze_text_tower(vlm)
    else:
        vlm, info = pretrain(cfg, device=device, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)  # atomic: a reader never sees half a file
        atomic_save({"state_dict": {k: v.cpu() for k, v in vlm.model.state_dict().items()}, "info": info}, path)
    vlm.pretrained = f"toy:{path.name}"
    return vlm


def shipped_path(cfg: PretrainConfig) -> Path:
    """Where the kit ships the weights of `cfg` (exists for the default configs only)."""
    return WEIGHTS_DIR / (cache_path(cfg, WEIGHTS_DIR).stem + ".npz")


def write_weights(vlm: VLM, path: str | Path, info: dict | None = None) -> Path:
    """The whole model's float32 state as a compressed .npz (exact bits; `read_weights` loads it), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    state = {k: v.detach().cpu().numpy() for k, v in vlm.model.state_dict().items()}
    np.savez_compressed(tmp, **state, __info__=np.frombuffer(json.dumps(info or {}).encode(), np.uint8))
    os.replace(tmp, path)
    return path


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    with np.load(path) as f:
        return {k: torch.from_numpy(f[k].copy()) for k in f.files if k != "__info__"}


def caption_stream(seed: int, batch_size: int, size: int = 32):
    """Endless fresh (images uint8, captions) batches for contrastive pretraining.
    A random template per image, combinations uniform over the whole world."""
    rng = np.random.default_rng(seed)
    while True:
        combos = rng.integers(0, world.N_COMBOS, size=batch_size)
        attrs = world.combo_to_attributes(combos)
        templates = rng.integers(0, len(world.TEMPLATES), size=batch_size)
        texts = [world.caption(a, int(t)) for a, t in zip(attrs, templates)]
        yield world.render_generic(combos, int(rng.integers(2 ** 31)), size), texts
