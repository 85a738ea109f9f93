"""Weight files given as `pretrained`, checked before they are used: a file that does not fit the model is an error
naming the file, the key and what to do, never a model that loads half of it in silence.

- `load_big_vision(trunk, path)`: a big_vision ViT `.npz` (the paper's SigLIP checkpoint) into a timm ViT trunk,
  through timm's own converter. Refused: an unreadable (truncated) archive, non-finite weights, a tensor whose
  shape does not fit (its key named), and keys of the image tower the model has no place for (e.g. an
  `encoderblock_12/` of a deeper model): each would otherwise load with no word. Keys outside the image tower (the
  text tower's `params/txt/`, the logit scale and bias) are the text side's and are left alone, and so is a
  classifier's `head/` (a tower without a classification head drops it, as timm does).
- `bad_checkpoint`: the one-line error for an open_clip checkpoint file that is another model's or not a state dict.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

IMAGE_PREFIXES = ("params/img/", "opt/target/", "params/", "")  # where timm looks for the image tower, in its order


class _Recorder(dict):
    """The archive's arrays, remembering which keys the converter read (in order)."""

    def __init__(self, arrays: dict):
        super().__init__(arrays)
        self.read: list[str] = []

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)


def read_npz(path: str | Path) -> dict:
    """Every array of an .npz, read whole (a truncated or damaged archive is named here, not deep in a loader)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a readable .npz archive ({type(e).__name__}: {e}); it may be truncated: "
                         "download or copy it again") from None


def image_prefix(arrays: dict) -> str:
    return next((p for p in IMAGE_PREFIXES if f"{p}embedding/kernel" in arrays), "")


def load_big_vision(trunk, path: str | Path, name: str) -> None:
    """Load a big_vision ViT checkpoint into `trunk` (a timm VisionTransformer), every check first."""
    import timm.models.vision_transformer as vit
    import torch
    arrays = read_npz(path)
    prefix = image_prefix(arrays)
    if f"{prefix}embedding/kernel" not in arrays:
        raise ValueError(f"{path} is not a big_vision ViT checkpoint for {name!r}: it has no embedding/kernel (keys: "
                         f"{sorted(arrays)[:5]}...)")
    mine = [k for k in arrays if k.startswith(prefix) and not (prefix == "params/" and k.startswith("params/txt/"))]
    for k in mine:
        a = arrays[k]
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{path}: {k} holds {int((~np.isfinite(a)).sum())} NaN or infinite value(s); the "
                             "checkpoint is damaged: download it again")
    w = _Recorder(arrays)
    original = getattr(vit, "_load_npz_checkpoint", None)
    if original is not None:  # hand timm the arrays read above (it would read the file again) and see what it reads
        vit._load_npz_checkpoint = lambda *a, **k: w
    try:
        vit._load_weights(trunk, str(path))
    except KeyError as e:
        raise ValueError(f"{path} is not a big_vision ViT checkpoint for {name!r}: it has no {e} (a shallower or "
                         "other model's checkpoint?)") from None
    except (RuntimeError, ValueError) as e:
        key = w.read[-1] if w.read else "?"
        raise ValueError(f"{path}: {key} has shape {tuple(arrays[key].shape) if key in arrays else '?'}, which does "
                         f"not fit {name!r} ({str(e).splitlines()[0]}); it is another model's checkpoint") from None
    finally:
        if original is not None:
            vit._load_npz_checkpoint = original
    if original is not None:
        dropped = (f"{prefix}head/", f"{prefix}pre_logits/")  # a classifier's head: a tower without one drops it
        unused = sorted(k for k in set(mine) - set(w.read) if not k.startswith(dropped))
        if unused:
            raise ValueError(f"{path}: {len(unused)} key(s) of its image tower have no place in {name!r}, e.g. "
                             f"{unused[:3]}: the checkpoint is of another (deeper or wider) model; give {name!r}'s "
                             "checkpoint or the model name that matches it")
    bad = [n for n, p in trunk.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"{path}: the loaded image tower has non-finite values in {bad[:3]}")


def bad_checkpoint(path, name: str, e: BaseException) -> ValueError:
    """The error for a `pretrained` file open_clip could not load into `name`."""
    import pickle
    if isinstance(e, pickle.UnpicklingError):
        why = "it holds objects other than tensors, which a safe load refuses to build"
    else:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        why = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return ValueError(f"{path} is not a checkpoint of {name!r} ({why}); give that model's open_clip weights (a state "
                      f"dict of tensors), a big_vision .npz, or a model.pt the kit wrote for {name!r}")
