"""Data: labelled image sets held as uint8 tensors, real image folders, and domain sampling.

- `Split`: images (N, 3, S, S) uint8 + integer labels (+ optional captions). Both the built-in world
  and real folders produce it, so the training loop and the metrics see one format.
- `load_image_folder(root, size)`: a real dataset in torchvision ImageFolder layout
  (root/<class>/<image>), decoded, resized (shorter side) and centre-cropped once to `size`.
- `domain_at(step, ...)`: which domain a training step draws from (the samplers of the paper's
  data mixing), and `batch_indices`: the indices of a batch. Both are pure functions of
  (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class Split:
    """Images (uint8, N x 3 x S x S) with integer labels; optional captions and the image each describes."""
    images: torch.Tensor
    labels: np.ndarray
    captions: list[str] = field(default_factory=list)
    caption_image: np.ndarray | None = None  # caption j describes image caption_image[j]
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"Split.images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"Split has {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


def load_image_folder(root: str | Path, size: int, max_per_class: int | None = None) -> Split:
    """Read root/<class_name>/<image file> into a Split (classes sorted by name, labels 0..C-1)."""
    from PIL import Image
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist; expected root/<class>/<image> files")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"dataset folder {root} has no class sub-folders; expected root/<class>/<image> files")
    images, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        for p in files[:max_per_class]:
            try:
                with Image.open(p) as im:
                    images.append(_resize_center_crop(im.convert("RGB"), size))
            except OSError as e:
                raise ValueError(f"cannot read image {p}: {e}. Remove or replace the file.") from e
            labels.append(c)
    if not images:
        raise ValueError(f"no images with extensions {IMAGE_EXTENSIONS} under {root}")
    return Split(torch.stack(images), np.array(labels), class_names=classes)


def _resize_center_crop(im, size: int) -> torch.Tensor:
    from PIL import Image
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


# ---------------------------------------------------------------------------- sampling
Sampler = Literal["target_only", "round_robin", "balanced", "proportional"]
SAMPLERS = ("target_only", "round_robin", "balanced", "proportional")


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream): the randomness of one training step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def domain_at(step: int, sampler: Sampler, seed: int, sizes: tuple[int, int]) -> int:
    """0 (target) or 1 (generic) for global step `step`.

    round_robin: target, generic, target, ... (the paper); balanced: each with probability 1/2;
    proportional: probability proportional to the datasets' sizes; target_only: always 0."""
    if sampler == "target_only":
        return 0
    if sampler == "round_robin":
        return step % 2
    p_generic = 0.5 if sampler == "balanced" else sizes[1] / (sizes[0] + sizes[1])
    if sampler == "proportional" or sampler == "balanced":
        return int(torch.rand(1, generator=step_generator(seed, step, 1)).item() < p_generic)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """batch_size distinct indices in [0, n) (all n if the set is smaller), drawn for this step."""
    return torch.randperm(n, generator=step_generator(seed, step, 2))[:batch_size]
