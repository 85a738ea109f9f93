"""Checks of a config's data that need the data read, made before any model work (`config.setup_from_config`):

- `verify_records` (in leakage.py, where every image is hashed): every record's image decoded once (a truncated
  PNG inside a valid TFRecord, or a record without its image feature, is named by file and record index here, not
  in a DataLoader worker mid-training); the decoded pixels' hashes are kept for the leakage check, so each image is
  decoded once;
- `check_retrieval`: every retrieval split (target and generic val and test) has a query with a positive: a class
  with two images, or a query whose class is in its index (else every metric of it is undefined).
"""
from __future__ import annotations

import numpy as np

from .leakage import verify_records  # noqa: F401  (decoded and hashed where the leakage check hashes)


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
