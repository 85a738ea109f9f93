"""Checks of a config's data that need the data read, made before any model work (`config.setup_from_config`):

- `verify_records`: every record's image decoded once (a truncated PNG inside a valid TFRecord, or a record without
  its image feature, is named by file and record index here, not in a DataLoader worker mid-training); the decoded
  pixels' hashes are kept for the leakage check, so each image is decoded once;
- `check_retrieval`: every retrieval split (target and generic val and test) has a query with a positive: a class
  with two images, or a query whose class is in its index (else every metric of it is undefined).
"""
from __future__ import annotations

import numpy as np


def verify_records(split) -> list[str]:
    """Decode every image of a records split (records.RecordSplit); their pixel hashes, kept on the split."""
    cached = getattr(split, "_pixel_hashes", None)
    if cached is not None and len(cached) == len(split):
        return cached
    from .leakage import pixel_hash
    out = []
    for i in range(len(split)):
        try:
            out.append(pixel_hash(split.image_bytes(i), name=f"record {split.name(i)}"))
        except (ValueError, RuntimeError, OSError) as e:
            f, pos, _ = split.where[i]
            path = split.files[f]
            raise ValueError(f"{path}: record {_index(split.kind, path, pos)} (key {split.name(i)!r}) has no readable "
                             f"image: {str(e).splitlines()[0]}. Replace or remove that record before training") from None
    split._pixel_hashes = out
    for reader in getattr(split, "_readers", {}).values():  # a DataLoader worker forked later must open its own
        getattr(reader, "close", lambda: None)()
    getattr(split, "_readers", {}).clear()
    return out


def _index(kind: str, path: str, pos: int) -> int:
    """A record's position in its file (ArrayRecord: its index; TFRecord: found from its byte offset)."""
    if kind != "tfrecord":
        return int(pos)
    from .records import tfrecord_offsets
    return next(j for j, (o, _) in enumerate(tfrecord_offsets(path)) if o == pos)


def _has_positive(split) -> bool:
    if hasattr(split, "query") and hasattr(split, "index"):  # a QueryIndex: queries against a separate index
        return bool(np.isin(split.query.labels, split.index.labels).any())
    _, counts = np.unique(split.labels, return_counts=True)
    return bool((counts >= 2).any())


def check_retrieval(domains, parts: dict, where: str) -> None:
    """Refuse a retrieval split in which no query has a positive (naming the split and what to do)."""
    for group, part, split in (("target", "val", domains.target_val), ("target", "test", domains.target_test),
                               ("generic", "val", domains.generic_val), ("generic", "test", domains.generic_test)):
        if _has_positive(split):
            continue
        spec = parts[group][part]
        if "query" in spec:
            raise ValueError(f"{where} [data.{group}.{part}]: no query's class is in the index, so retrieval has no "
                             "positive to find; give an index that holds the queries' classes")
        hint = ""
        if spec.get("format") == "generic_folder" and spec.get("part") == "val":
            frac = spec.get("val_fraction", 0.2)
            hint = (f" (val_fraction = {frac} of each class leaves at most one validation image per class here: "
                    f"raise val_fraction, or give the classes at least {int(np.ceil(1.5 / frac - 1e-9))} images each)")
        raise ValueError(f"{where} [data.{group}.{part}]: every class has a single image ({len(split)} images, "
                         f"{len(np.unique(split.labels))} classes), so no query has a positive and retrieval cannot be "
                         f"measured{hint}; give it at least two images of some classes")
