"""Pre-extracted teacher embeddings for distillation (the paper's pipeline, step 1).

The frozen pretrained model embeds the generic training images once, with eval preprocessing;
distillation then costs no extra forward pass. The embeddings are stored index-aligned with the
images together with a fingerprint of (model weights, input size, image bytes): training refuses
embeddings whose fingerprint does not match the model it starts from and the data it is given,
so a stale or misaligned file cannot be used silently (the official code read them from a
different folder than it wrote them to).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .models import VLM, embed_images


def fingerprint(vlm: VLM, images: torch.Tensor) -> str:
    """sha256 over the image tower's weights, the input size and the image bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    h.update(f"{vlm.name}|{vlm.image_size}|{tuple(images.shape)}".encode())
    for k, v in sorted(vlm.visual.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(images.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class TeacherEmbeddings:
    embeddings: torch.Tensor  # (N, D) float32, L2-normalised, row i = image i of the split
    fingerprint: str

    def check(self, vlm: VLM, images: torch.Tensor, what: str = "generic") -> None:
        if len(self.embeddings) != len(images):
            raise ValueError(f"teacher embeddings have {len(self.embeddings)} rows for {len(images)} {what} images; "
                             "extract them again with extract_teacher(model, images)")
        fp = fingerprint(vlm, images)
        if fp != self.fingerprint:
            raise ValueError(f"teacher embeddings were extracted from another model or other {what} images "
                             f"(fingerprint {self.fingerprint} != {fp}); extract them again with "
                             "extract_teacher(pretrained_model, images) before fine-tuning starts")

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save({"embeddings": self.embeddings, "fingerprint": self.fingerprint}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "TeacherEmbeddings":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["embeddings"], d["fingerprint"])


def extract_teacher(vlm: VLM, images: torch.Tensor, batch_size: int = 256, progress: bool = True) -> TeacherEmbeddings:
    """Embed `images` with the (pretrained, frozen) model, eval preprocessing, and fingerprint the pair."""
    emb = embed_images(vlm, images, batch_size=batch_size, progress=progress)
    return TeacherEmbeddings(torch.from_numpy(np.ascontiguousarray(emb)), fingerprint(vlm, images))
