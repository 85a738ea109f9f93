"""Leakage checks on a config's data, before any work: the same image in two splits, or a class in both the
target's training and evaluation splits, would make the numbers mean something else.

- identical image content (sha256 of the file's bytes, or of the pixels in memory) across the target's train, val
  and test splits, and between the generic train split and the generic val and test splits;
- class ids shared by the target's train split and its val or test split (open-set retrieval: the evaluation
  classes must be new).
Each is an error naming the splits and examples; `[data] allow_leakage = true` skips the checks (documented, for
a user who means it, e.g. a closed-set evaluation).
"""
from __future__ import annotations

import hashlib

import numpy as np

from .data import FileSplit, Split


def content_hashes(split) -> list[str]:
    """One hash per item: of the file's bytes (FileSplit) or of the decoded pixels (Split)."""
    if isinstance(split, FileSplit):
        out = []
        for p in split.paths:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out.append(h.hexdigest())
        return out
    if isinstance(split, Split):
        return [hashlib.sha256(img.contiguous().numpy().tobytes()).hexdigest() for img in split.images]
    if hasattr(split, "image_bytes"):  # records: the encoded image each holds
        return [hashlib.sha256(split.image_bytes(i)).hexdigest() for i in range(len(split))]
    if hasattr(split, "query") and hasattr(split, "index"):  # queries and their gallery (evaluation.QueryIndex)
        return content_hashes(split.query) + content_hashes(split.index)
    raise TypeError(f"cannot hash a {type(split).__name__}")


def _name(split, i: int) -> str:
    if hasattr(split, "query") and hasattr(split, "index"):
        nq = len(split.query)
        return f"query {_name(split.query, i)}" if i < nq else f"index {_name(split.index, i - nq)}"
    if isinstance(split, FileSplit):
        return split.paths[i]
    return f"record {split.keys[i]}" if getattr(split, "keys", None) else f"image {i}"


def shared_images(a, b) -> list[tuple[str, str]]:
    """(item of a, item of b) pairs with the same content."""
    first = {}
    for i, h in enumerate(content_hashes(a)):
        first.setdefault(h, i)
    return [(_name(a, first[h]), _name(b, j)) for j, h in enumerate(content_hashes(b)) if h in first]


def check_domains(domains, where: str, allowed: bool = False) -> None:
    """Raise ValueError on leakage between the splits of an experiment's Domains (unless allowed)."""
    if allowed:
        return
    problems = []
    pairs = [("target", "train", domains.target_train, "val", domains.target_val),
             ("target", "train", domains.target_train, "test", domains.target_test),
             ("target", "val", domains.target_val, "test", domains.target_test),
             ("generic", "train", domains.generic_train, "val", domains.generic_val),
             ("generic", "train", domains.generic_train, "test", domains.generic_test)]
    for group, an, a, bn, b in pairs:
        same = shared_images(a, b)
        if same:
            eg = "; ".join(f"{x} = {y}" for x, y in same[:3])
            problems.append(f"{len(same)} image(s) of [data.{group}] {bn} are also in {an} (same content), e.g. {eg}")
    for bn, b in (("val", domains.target_val), ("test", domains.target_test)):
        common = np.intersect1d(np.unique(domains.target_train.labels), np.unique(b.labels))
        if len(common):
            problems.append(f"{len(common)} class id(s) of [data.target] train are also in {bn}, e.g. "
                            f"{common[:5].tolist()}: open-set retrieval evaluates on classes training never saw "
                            "(give the splits disjoint classes)")
    if problems:
        raise ValueError(f"{where}: the data leak between splits:\n  " + "\n  ".join(problems) +
                         "\nFix the splits, or set [data] allow_leakage = true to run anyway (the numbers then no "
                         "longer measure what README says they do).")
