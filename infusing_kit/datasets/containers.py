"""The data containers of an experiment, below the code that builds or reads them: `Domains` (an experiment's
splits), `QueryIndex` (a test split searched against a separate gallery) and `TextProbe` (an image-text test set with
precomputed text embeddings). The built-in world fills a Domains with `world.domains`, a config with
`config.build_domains`."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Domains:
    """The data of one experiment (each a data.Split or data.FileSplit).

    target_*: the fine-grained domain, class-disjoint splits. generic_train: images the regularizers use
    (replay, teacher, Fisher); generic_val: selection; generic_test: reporting (either test split may be an
    `containers.QueryIndex`: queries against a gallery). text_test: images with captions (`captions`,
    `caption_image`) or with precomputed text embeddings (`containers.TextProbe`). generic_prompts: one text per generic class (LwF's zero-shot
    logits and EWC's Fisher use them), indexed by the generic labels; None when the generic data have none."""
    target_train: object
    target_val: object
    target_test: object
    generic_train: object
    generic_val: object
    generic_test: object
    text_test: object
    generic_prompts: list[str] | None = None
    merged_index: bool = False        # test also with the merged-index protocol (evaluation.evaluate)
    tests: dict = field(default_factory=dict)  # extra test sets: name -> testsets.TestSet (a config's [data.tests])


@dataclass
class QueryIndex:
    """A test split whose queries are searched against a separate index (gallery) that holds their positives (no
    query is in the index). As a split (galleries, drift, leakage checks) it is the queries followed by the index."""
    query: object
    index: object

    def __len__(self) -> int:
        return len(self.query) + len(self.index)

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([self.query.labels, self.index.labels])

    def take(self, idx) -> torch.Tensor:
        idx, nq = np.asarray(idx).reshape(-1), len(self.query)
        parts = [self.query.take([i]) if i < nq else self.index.take([i - nq]) for i in idx]
        return torch.cat(parts) if parts else self.query.take([])

    def rows(self, start: int, stop: int):
        from .data import Split
        return Split(self.take(np.arange(start, stop)), self.labels[start:stop])

    def fingerprint(self) -> str:
        return f"{self.query.fingerprint()}+{self.index.fingerprint()}"


@dataclass
class TextProbe:
    """The image-text test set as the paper's release gives it: images (any split) and, instead of captions,
    their precomputed text embeddings (T, D), caption_image[j] = the image caption j describes."""
    images: object
    text_embeddings: np.ndarray
    caption_image: np.ndarray
    caption_ids: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def take(self, idx) -> torch.Tensor:
        return self.images.take(idx)

    def rows(self, start: int, stop: int):
        return self.images.rows(start, stop)

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels

    def fingerprint(self) -> str:
        import hashlib
        h = hashlib.sha256(self.images.fingerprint().encode())
        h.update(np.ascontiguousarray(self.text_embeddings, dtype=np.float32).tobytes())
        h.update(np.asarray(self.caption_image, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]
