"""Vision-language models for the kit: any open_clip model, plus the kit's own tiny CPU configs.

- `load_model(name, pretrained)` -> `VLM`: the open_clip model, its tokenizer and preprocessing.
  `pretrained` is an open_clip tag or file, a transformers CLIP / SigLIP checkpoint (`hfweights`), a big_vision
  `.npz`, `None` (random init), or a `model.pt` the kit wrote
  (`save_finetuned`: a fine-tuned image tower loads back onto its model). The kit's toy VLM pretrained on
  the built-in world comes from `pretrain.load_pretrained_toy`. The tokenizer loads on first use, so a model
  whose tokenizer needs extra packages or a download (SigLIP's) still loads and trains its image tower.
- Only the image tower is ever fine-tuned: `freeze_text_tower` turns gradients off everywhere else
  and `train_mode` keeps the text side in eval mode.
- Preprocessing works on uint8 image tensors (N, 3, H, W): `preprocess(vlm, x, train=...)`
  resizes, optionally augments and normalises. `embed_images` / `embed_texts` return
  L2-normalised float32 numpy arrays.
- `param_groups` splits trainable parameters into backbone and head groups (two learning rates).
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Literal

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # registers toy-clip, toy-clip-tiny
TOY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


@dataclass
class VLM:
    """An open_clip model with what the kit needs around it."""
    model: torch.nn.Module           # open_clip CLIP / CustomTextCLIP
    name: str
    pretrained: str | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int = 0               # the image embedding's dimension
    _tokenizer: Callable | None = None

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def tokenizer(self) -> Callable:
        """texts -> (N, context_length) int64; loaded on first use (only captions and class prompts need it)."""
        if self._tokenizer is None:
            self._tokenizer = _toy_tokenizer() if self.name in TOY_MODELS else _open_clip_tokenizer(self.name)
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model(name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
               image_size: int | None = None, cache_dir: str | Path | None = None, seed: int | None = None) -> VLM:
    """Create an open_clip model by name (e.g. "ViT-B-32", "ViT-B-16-SigLIP", "toy-clip").

    pretrained: an open_clip tag ("laion2b_s34b_b79k", "webli", ...) or a checkpoint file, None for random
    weights, a `model.pt` written by the kit (its fine-tuned image tower, on the model it was trained from), a
    big_vision `.npz`, or a transformers CLIP / SigLIP folder or .safetensors / .bin file (`hfweights`).
    image_size: overrides the model's input size (e.g. 112 for fast CPU runs of a ViT-B).
    seed: random initialisation (pretrained=None) from this seed, both towers, without touching the global random
    state: the same config gives the same starting model in every process.
    The text tower is frozen on return (see `freeze_text_tower`).
    """
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower()[:5] in m.lower()][:8]
        raise ValueError(f"unknown model name {name!r}: not an open_clip config nor one of the kit's "
                         f"{list(TOY_MODELS)}. Close matches: {close}; all: open_clip.list_models()")
    if pretrained == "toy":
        raise ValueError("the toy VLM pretrained on the built-in world comes from "
                         "infusing_kit.pretrain.load_pretrained_toy(name)")
    kit = _kit_checkpoint(pretrained)
    if kit is not None:
        return _load_finetuned(kit, name, pretrained, device, image_size, cache_dir)
    from .hfweights import load_hf, source
    hf = source(pretrained)  # a transformers CLIP / SigLIP folder or file: converted to open_clip's names
    if hf is not None:
        vlm = load_hf(load_model(name, None, "cpu", image_size, cache_dir, seed=0 if seed is None else seed), name,
                      pretrained, *hf)
        vlm.model.to(device)
        freeze_text_tower(vlm)
        return vlm
    if str(pretrained or "").endswith(".npz"):
        return _load_big_vision(name, pretrained, device, image_size, cache_dir, seed)
    if pretrained is not None and not Path(str(pretrained)).is_file() and (os.sep in str(pretrained) or
                                                                        str(pretrained).endswith((".pt", ".bin", ".safetensors", ".pth"))):
        raise FileNotFoundError(f"checkpoint file {pretrained} does not exist (pretrained=...)")
    kwargs = {"force_image_size": image_size} if image_size else {}
    try:
        # pretrained=None asks for random weights: open_clip's "no pretrained weights loaded" warning is noise here
        logging.disable(logging.WARNING if pretrained is None else logging.NOTSET)
        if seed is not None and pretrained is None:  # seeded, and the caller's random state left as it was
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = open_clip.create_model(name, pretrained=None, device=device, cache_dir=cache_dir, **kwargs)
        else:
            model = open_clip.create_model(name, pretrained=pretrained, device=device, cache_dir=cache_dir, **kwargs)
    except RuntimeError as e:
        if pretrained and not Path(str(pretrained)).is_file() and ("download" in str(e).lower() or "connect" in str(e).lower()):
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            raise RuntimeError(
                f"pretrained weights {pretrained!r} for {name!r} are not on this machine and cannot be "
                f"downloaded{' (HF_HUB_OFFLINE is set)' if offline else ''}. Pass a local checkpoint file as "
                f"pretrained=..., run once with internet to fill the Hugging Face cache, or use "
                f"pretrained=None / the kit's offline toy model pretrain.load_pretrained_toy('toy-clip').") from e
        if pretrained is not None and Path(str(pretrained)).is_file():
            from .weightfiles import bad_checkpoint
            raise bad_checkpoint(pretrained, name, e) from None
        raise ValueError(f"cannot create {name!r} with pretrained={pretrained!r}: {e}") from e
    except (AssertionError, AttributeError, KeyError, TypeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        if pretrained is None or not Path(str(pretrained)).is_file():
            raise
        from .weightfiles import bad_checkpoint  # another model's state dict, or not a state dict at all
        raise bad_checkpoint(pretrained, name, e) from None
    finally:
        logging.disable(logging.NOTSET)
    cfg = model.visual.preprocess_cfg
    embed_dim = int(open_clip.get_model_config(name)["embed_dim"])
    vlm = VLM(model, name, pretrained, int(cfg["size"][0] if isinstance(cfg["size"], (tuple, list)) else cfg["size"]),
              tuple(cfg["mean"]), tuple(cfg["std"]), embed_dim)
    freeze_text_tower(vlm)
    return vlm


def _load_big_vision(name: str, path, device, image_size, cache_dir, seed) -> VLM:
    """A big_vision `.npz` (the paper's SigLIP checkpoint, e.g. webli_en_b16_224_63724782.npz) into the timm ViT
    image tower of an open_clip model (ViT-B-16-SigLIP), through timm's own big_vision loader (its image sub-tree,
    `params/img/`, found by timm). The text tower stays randomly initialised (seeded: the same in every process),
    so image-text retrieval needs the release's precomputed text embeddings (format "text_embeddings")."""
    import warnings
    if not Path(str(path)).is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist (pretrained=...)")
    vlm = load_model(name, None, device, image_size, cache_dir, seed=0 if seed is None else seed)
    trunk = getattr(vlm.model.visual, "trunk", None)
    if trunk is None or not hasattr(trunk, "blocks") or not hasattr(trunk, "patch_embed"):
        raise ValueError(f"{path}: a big_vision checkpoint loads into a timm ViT image tower (e.g. ViT-B-16-SigLIP); "
                         f"{name!r} has a {type(vlm.model.visual).__name__} tower")
    from .weightfiles import load_big_vision  # timm's converter, every key and value checked around it
    load_big_vision(trunk, path, name)
    warnings.warn(f"{path}: the image tower is the checkpoint's; the text tower of {name} is random (use precomputed "
                  "text embeddings for image-text retrieval)", stacklevel=2)
    vlm.pretrained = str(path)
    vlm.mean, vlm.std = _release_normalisation(name, vlm.mean, vlm.std)
    vlm.random_text = True  # seeded from the config: save_finetuned keeps it
    return vlm


def _release_normalisation(name: str, mean, std):
    """The input normalisation of `name`'s released weights (SigLIP's 0.5 / 0.5, not the OpenAI default that
    open_clip gives a model made without a pretrained tag), when all its tags agree; else (mean, std) unchanged."""
    norms = set()
    for tag in open_clip.list_pretrained_tags_by_model(name):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        if cfg.get("mean") and cfg.get("std"):
            norms.add((tuple(cfg["mean"]), tuple(cfg["std"])))
    return norms.pop() if len(norms) == 1 else (mean, std)


FINETUNED_FORMAT = "infusing_kit/finetuned-v1"


def save_finetuned(vlm: VLM, path: str | Path, head: torch.nn.Module | None = None, extra: dict | None = None) -> Path:
    """Write the fine-tuned image tower as a file `load_model(name, path)` loads back (atomically): the tower's
    weights, the model it belongs to (name and pretrained tag) and, for the kit's small toy models, the frozen
    text tower too (so no cache is needed to load it)."""
    from .checkpoints import atomic_save
    text = None
    if vlm.name in TOY_MODELS or vlm.pretrained is None or getattr(vlm, "random_text", False):
        # a random text tower (or a toy model's) cannot be made again from its tag: keep it
        text = {k: v for k, v in vlm.model.state_dict().items() if not k.startswith("visual.")}
    return atomic_save({"format": FINETUNED_FORMAT, "model": vlm.name, "base": vlm.pretrained,
                        "image_size": vlm.image_size, "mean": list(vlm.mean), "std": list(vlm.std),
                        "visual": vlm.visual.state_dict(), "text": text,
                        "head": head.state_dict() if head is not None else None, **(extra or {})}, path)


def _kit_checkpoint(pretrained) -> dict | None:
    if pretrained is None or not str(pretrained).endswith(".pt") or not Path(str(pretrained)).is_file():
        return None
    try:
        ckpt = torch.load(pretrained, map_location="cpu", weights_only=True)
    except Exception:  # not a plain tensor dict: leave it to open_clip
        return None
    return ckpt if isinstance(ckpt, dict) and ckpt.get("format") == FINETUNED_FORMAT else None


def _load_finetuned(ckpt: dict, name: str, path, device, image_size, cache_dir) -> VLM:
    if ckpt["model"] != name:
        raise ValueError(f"{path} holds a fine-tuned {ckpt['model']!r}, not {name!r}: load_model({ckpt['model']!r}, "
                         f"{str(path)!r})")
    size = image_size or ckpt.get("image_size")
    if ckpt.get("text") is not None:  # a toy model: everything is in the file
        vlm = load_model(name, None, "cpu", image_size=size)
        vlm.model.load_state_dict({**ckpt["text"], **{f"visual.{k}": v for k, v in ckpt["visual"].items()}})
    else:
        vlm = load_model(name, ckpt["base"], "cpu", image_size=size, cache_dir=cache_dir)
        vlm.visual.load_state_dict(ckpt["visual"])
    if ckpt.get("mean") and ckpt.get("std"):  # the normalisation it was fine-tuned with (files since SigLIP's fix)
        vlm.mean, vlm.std = tuple(ckpt["mean"]), tuple(ckpt["std"])
    vlm.model.to(device)
    freeze_text_tower(vlm)
    vlm.pretrained = str(path)
    return vlm


def _toy_tokenizer():
    from .world import ToyTokenizer
    return ToyTokenizer()


def _open_clip_tokenizer(name: str):
    try:
        return open_clip.get_tokenizer(name)
    except (ImportError, ModuleNotFoundError) as e:
        raise ImportError(f"the tokenizer of {name!r} needs {e.name or 'an extra package'}: pip install "
                          f"'infusing_kit[siglip]' (transformers, sentencepiece). Only captions and class prompts "
                          f"need it; the image tower trains without.") from e
    except OSError as e:  # a hub tokenizer that is not cached and cannot be downloaded
        raise RuntimeError(f"the tokenizer of {name!r} is not on this machine and cannot be downloaded "
                           f"({e}); run once with internet to fill the Hugging Face cache") from e


def config_embed_dim(name: str) -> int:
    """The embedding width of an open_clip model name, from its config (no weights loaded)."""
    return int((open_clip.get_model_config(name) or {})["embed_dim"])


def config_image_size(name: str) -> int:
    """The image side of an open_clip model name, from its config (224 when it names none)."""
    cfg = open_clip.get_model_config(name) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def freeze_text_tower(vlm: VLM) -> None:
    """requires_grad=False on everything outside the image tower (text tower, logit scale)."""
    for n, p in vlm.model.named_parameters():
        p.requires_grad_(n.startswith("visual."))
    vlm.model.eval()


def train_mode(vlm: VLM, train: bool = True) -> None:
    """Put only the image tower in train mode; the frozen text side always stays in eval mode, and so does every
    normalisation layer of the tower whose parameters are all frozen (a frozen BatchNorm keeps its running
    statistics: freezing a ResNet's first blocks freezes them, not just their weights)."""
    vlm.model.eval()
    vlm.visual.train(train)
    if train:
        for m in vlm.visual.modules():
            params = list(m.parameters())
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) and params and not any(p.requires_grad for p in params):
                m.eval()


def trainable_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------- preprocessing
Augment = Literal["none", "jitter", "crop_flip"]


def preprocess(vlm: VLM, images: torch.Tensor, train: bool = False, augment: Augment = "none",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> normalised float (N, 3, S, S) on the model's device.

    Eval: resize to the model size. Train adds `augment`: "jitter" (random +-2 px translation with
    edge padding; keeps fine marks intact), "crop_flip" (random resized crop, scale 0.5-1, and
    horizontal flip; for natural photos). `generator` makes augmentation deterministic."""
    x = images.to(vlm.device, non_blocking=True).float().div_(255)
    if x.shape[-1] != vlm.image_size or x.shape[-2] != vlm.image_size:
        x = F.interpolate(x, size=(vlm.image_size, vlm.image_size), mode="bilinear", antialias=True, align_corners=False)
    if train and augment != "none":
        x = _augment(x, augment, generator)
    mean = torch.tensor(vlm.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(vlm.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _augment(x: torch.Tensor, kind: str, generator: torch.Generator | None) -> torch.Tensor:
    n, _, h, w = x.shape
    if kind == "jitter":
        shift = torch.randint(-2, 3, (n, 2), generator=generator)
        pad = F.pad(x, (2, 2, 2, 2), mode="replicate")
        rows = (torch.arange(h)[None] + 2 - shift[:, 1:2]).to(x.device)  # (n, h)
        cols = (torch.arange(w)[None] + 2 - shift[:, 0:1]).to(x.device)
        idx = torch.arange(n, device=x.device)[:, None, None]
        return pad.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if kind == "crop_flip":
        scale = torch.empty(n).uniform_(0.5, 1.0, generator=generator).sqrt()
        off = torch.rand(n, 2, generator=generator) * (1 - scale[:, None]) * 2 - (1 - scale[:, None])
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
        theta[:, :, 2] = off
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    raise ValueError(f"augment must be 'none', 'jitter' or 'crop_flip', got {kind!r}")


# ---------------------------------------------------------------------------- embeddings
def image_embedding(vlm: VLM, pixels: torch.Tensor) -> torch.Tensor:
    """The retrieval embedding: the image tower's (projected) output, L2-normalised. Differentiable."""
    return F.normalize(vlm.visual(pixels).float(), dim=-1)


@torch.no_grad()
def embed_images(vlm: VLM, images, batch_size: int = 256, progress: bool = True,
                 out: np.ndarray | None = None) -> np.ndarray:
    """L2-normalised float32 embeddings (N, D), eval preprocessing, of uint8 images (N, 3, H, W) or of a split
    (`data.Split` / `data.FileSplit`, the latter decoded in chunks by DataLoader workers: memory does not grow
    with N). out: an (N, D) array to fill (e.g. a memory-mapped file)."""
    from . import distributed
    if distributed.active():  # each process embeds its part, then every process gets the whole
        n = len(images)
        part = distributed.local_slice(n)
        mine = images[part] if isinstance(images, torch.Tensor) else images.rows(part.start, part.stop)
        full = distributed.gather_rows(_embed_local(vlm, mine, batch_size, progress and distributed.is_main()), n)
        if out is not None:
            out[:] = full
            return out
        return full
    return _embed_local(vlm, images, batch_size, progress, out)


def _embed_local(vlm: VLM, images, batch_size: int, progress: bool, out: np.ndarray | None = None) -> np.ndarray:
    from .datasets.data import Split
    from .datasets.sampling import chunks
    n = len(images)
    if not isinstance(images, (Split, torch.Tensor)):  # decoded on demand (files, records)
        source = chunks(images, batch_size)
    else:
        tensor = images.images if isinstance(images, Split) else images
        source = (tensor[i:i + batch_size] for i in range(0, n, batch_size))
    was_training = vlm.visual.training
    vlm.visual.eval()
    row = 0
    bar = progress_bar(None, progress, total=n, desc="embed images", leave=False)
    for x in source:
        with _autocast(vlm.device):
            e = image_embedding(vlm, preprocess(vlm, x)).cpu().numpy()
        if out is None:
            out = np.zeros((n, e.shape[1]), np.float32)
        out[row:row + len(e)] = e
        row += len(e)
        bar.update(len(e))
    bar.close()
    vlm.visual.train(was_training)
    return out if out is not None else np.zeros((0, vlm.embed_dim), np.float32)


@torch.no_grad()
def embed_texts(vlm: VLM, texts: Iterable[str], batch_size: int = 512, progress: bool = True) -> np.ndarray:
    """L2-normalised float32 embeddings (N, D) of texts from the frozen text tower."""
    texts = list(texts)
    vlm.model.eval()
    out = []
    for i in progress_bar(range(0, len(texts), batch_size), progress, desc="embed texts", leave=False):
        tokens = vlm.tokenizer(texts[i:i + batch_size]).to(vlm.device)
        with _autocast(vlm.device):
            out.append(F.normalize(vlm.model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out).numpy().astype(np.float32)


def progress_bar(iterable=None, enabled: bool = True, **kwargs):
    """tqdm, off when enabled=False or the environment sets TQDM_DISABLE (CI, papermill)."""
    quiet = os.environ.get("TQDM_DISABLE", "").lower() not in ("", "0", "false")
    return tqdm(iterable, disable=quiet or not enabled, **kwargs)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---------------------------------------------------------------------------- optimisation
def param_groups(vlm: VLM, head: torch.nn.Module | None, lr_backbone: float, lr_head: float,
                 weight_decay: float) -> list[dict]:
    """AdamW groups: trainable image-tower parameters at lr_backbone, the head at lr_head.
    Weight decay applies to all, as in the paper's optax.adamw."""
    groups = [{"name": "backbone", "params": [p for p in vlm.visual.parameters() if p.requires_grad],
               "lr": lr_backbone, "weight_decay": weight_decay}]
    if head is not None:
        groups.append({"name": "head", "params": list(head.parameters()), "lr": lr_head, "weight_decay": weight_decay})
    return groups


