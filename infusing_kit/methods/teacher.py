"""Pre-extracted teacher embeddings for distillation (the paper's pipeline, step 1).

The frozen pretrained model embeds the generic training images once, with eval preprocessing; distillation then
costs no extra forward pass. The embeddings are stored index-aligned with the images, together with a
fingerprint of (model name, input size, tower weights, data): training refuses embeddings whose fingerprint does
not match the model it starts from and the data it is given, so a stale or misaligned file cannot be used
silently (the official code read them from a different folder than it wrote them to).

`extract_teacher(vlm, data, path=...)` writes them to a memory-mapped `path` (.npy) in chunks, with a small
`path.json` recording the fingerprint and the rows done: an extraction killed part-way continues where it
stopped, and a large generic set never has to fit in memory.

`TrajectoryTeacher` is the other kind: a live teacher whose weights follow training (TRACER's averaged teacher).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..datasets.data import Split
from ..checkpoints import atomic_save, atomic_write_text, tower_fingerprint
from ..models import VLM, embed_images, preprocess, progress_bar
from .regularizers import WeightAverage


def data_fingerprint(data) -> str:
    """The images a teacher embeds: pixels of an in-memory split or tensor, the file list of a FileSplit."""
    if not isinstance(data, (Split, torch.Tensor)):  # decoded on demand (files, records): their own fingerprint
        return data.fingerprint()
    if isinstance(data, Split):
        data = data.images
    h = hashlib.sha256(f"{tuple(data.shape)}".encode())  # uint8 pixels
    h.update(data.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(vlm: VLM, data) -> str:
    """sha256 over the model name, input size, tower weights and the data (first 16 hex digits)."""
    key = f"{vlm.name}|{vlm.image_size}|{tower_fingerprint(vlm.visual)}|{data_fingerprint(data)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class TeacherEmbeddings:
    embeddings: torch.Tensor  # (N, D) float32, L2-normalised, row i = image i of the split
    fingerprint: str

    def check(self, vlm: VLM, data, what: str = "generic") -> None:
        if len(self.embeddings) != len(data):
            raise ValueError(f"teacher embeddings have {len(self.embeddings)} rows for {len(data)} {what} images; "
                             "extract them again with extract_teacher(model, images)")
        bad = (~torch.isfinite(self.embeddings).all(1)).nonzero().flatten()
        if len(bad):
            raise ValueError(f"teacher embeddings of {len(bad)} {what} image(s) are not finite (rows {bad[:5].tolist()}): "
                             "the file is damaged or the pretrained model produced NaN on those images; extract them "
                             "again (delete the teacher file) and check those images")
        fp = fingerprint(vlm, data)
        if fp != self.fingerprint:
            raise ValueError(f"teacher embeddings were extracted from another model or other {what} images "
                             f"(fingerprint {self.fingerprint} != {fp}); extract them again with "
                             "extract_teacher(pretrained_model, images) before fine-tuning starts")

    def save(self, path: str | Path) -> None:
        atomic_save({"embeddings": self.embeddings, "fingerprint": self.fingerprint}, path)

    @classmethod
    def load(cls, path: str | Path) -> "TeacherEmbeddings":
        d = torch.load(path, map_location="cpu", weights_only=True)
        return cls(d["embeddings"], d["fingerprint"])


def extract_teacher(vlm: VLM, data, batch_size: int = 256, progress: bool = True, path: str | Path | None = None,
                    chunk: int = 8192) -> TeacherEmbeddings:
    """Embed `data` (uint8 images, a Split or a FileSplit) with the (pretrained, frozen) model, eval preprocessing,
    and fingerprint the pair. path=None: in memory. path=FILE.npy: a memory-mapped file filled `chunk` rows at a
    time, resumable (FILE.npy.json records the fingerprint and the rows done)."""
    fp = fingerprint(vlm, data)
    if path is None:
        emb = embed_images(vlm, data, batch_size=batch_size, progress=progress)
        return TeacherEmbeddings(torch.from_numpy(np.ascontiguousarray(emb)), fp)
    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    n, dim = len(data), vlm.embed_dim
    meta = json.loads(meta_path.read_text()) if meta_path.exists() and path.exists() else None
    if meta is not None and (meta["fingerprint"] != fp or meta["rows"] != n or meta["dim"] != dim):
        raise ValueError(f"{path} holds teacher embeddings of another model or other data (fingerprint "
                         f"{meta['fingerprint']} != {fp}); delete {path} and {meta_path} to extract again")
    if meta is None:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim)).flush()
        meta = {"fingerprint": fp, "rows": n, "dim": dim, "done": 0}
        atomic_write_text(json.dumps(meta), meta_path)
    emb = np.load(path, mmap_mode="r+")
    bar = progress_bar(None, progress, total=n, initial=meta["done"], desc="teacher embeddings")
    for start in range(meta["done"], n, chunk):
        stop = min(n, start + chunk)
        part = data[start:stop] if isinstance(data, torch.Tensor) else data.rows(start, stop)
        embed_images(vlm, part, batch_size=batch_size, progress=False, out=emb[start:stop])
        emb.flush()
        meta["done"] = stop
        atomic_write_text(json.dumps(meta), meta_path)  # only after the rows are on disk
        bar.update(stop - start)
    bar.close()
    return TeacherEmbeddings(torch.from_numpy(np.load(path, mmap_mode="c")), fp)  # copy-on-write: never changes the file


class TrajectoryTeacher:
    """A teacher whose weights are CLIPood's Beta moving average of the fine-tuning trajectory (Shu et al. 2023): a
    frozen copy of the tower at the start whose trainable parameters (`names`) hold a = sum_t w_t theta_t / sum_t w_t
    over theta0 and the weights after every backbone update, w_t the Beta(alpha, beta) density at the update's
    position in the `steps` target steps (`regularizers.beta_weight`). A step rule (terms.TrajectoryAverage) updates
    it; buffers (BatchNorm statistics) stay the pretrained ones. TRACER (2026) distils towards a weighted moving
    average of the trajectory instead of the frozen model; the kit takes CLIPood's Beta weights for it (as issue 35
    describes it) and keeps only the image-side embedding distillation, not TRACER's contrastive loss or its other
    distillation views."""

    def __init__(self, vlm: VLM, names: list[str], steps: int, alpha: float = 0.5, beta: float = 0.5):
        self.vlm = vlm  # for its preprocessing and device only; the tower is the copy
        self.tower = copy.deepcopy(vlm.visual).eval().requires_grad_(False)
        own = dict(self.tower.named_parameters())
        self.average = WeightAverage("bma", [own[n] for n in names], steps=steps, alpha=alpha, beta=beta, share=True)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised float32 embeddings of uint8 images, eval preprocessing (as a pre-extracted teacher)."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.vlm.device.type == "cuda"):
            return torch.nn.functional.normalize(self.tower(preprocess(self.vlm, images)).float(), dim=-1)
