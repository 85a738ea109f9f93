"""Leakage checks on a config's data, before any work: the same image in two splits, or a class in both the
target's training and evaluation splits, would make the numbers mean something else.

- identical image content across the target's train, val and test splits, between the generic train split and the
  generic val and test splits, and (with `[data] merged_index = true`) between the two test splits, whose images
  would sit twice in the one merged index. Content is the decoded pixels (RGB uint8 at full size, EXIF orientation
  applied; `data.decode_rgb`), so a copy saved again (another PNG compression, 16-bit, JPEG re-saved losslessly as
  PNG) is the same image; files are decoded in threads, once per process for the same files (a study's trials);
- classes shared by the target's train split and its val or test split (open-set retrieval: the evaluation
  classes must be new). Which labels mean the same class is `[data] label_space`:
    "auto" (default): splits read from folders or CSV class names (image_folder, generic_folder, csv with names)
            number their classes from 0 each, so their class *names* are compared; splits whose files give the
            class ids (split_file, csv with integer labels, records) compare ids; a mix compares nothing;
    "shared": every split's ids are of one label space: ids are compared;
    "per_split": each split numbers its own classes: nothing is compared (the image check stays on).
Each is an error naming the splits and examples; `[data] allow_leakage = true` skips both checks (documented, for
a user who means it, e.g. a closed-set evaluation with images in common).
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .data import FileSplit, Split, decode_rgb

LABEL_SPACES = ("auto", "shared", "per_split")


def pixel_hash(source, name: str | None = None) -> str:
    """sha256 of an image's decoded pixels and their shape (a file path or encoded bytes)."""
    img = decode_rgb(source, name).contiguous()
    return hashlib.sha256(f"{tuple(img.shape)}|".encode() + img.numpy().tobytes()).hexdigest()


def _threads() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


_RECENT: dict[str, list[str]] = {}  # fingerprint -> hashes of the last splits hashed (a study's trials read the same)


def content_hashes(split) -> list[str]:
    """One hash per item, of its decoded pixels (files and records decoded at full size; a Split's tensors)."""
    if isinstance(split, FileSplit):
        key = f"files:{split.fingerprint()}"
        if key not in _RECENT:
            with ThreadPoolExecutor(_threads()) as pool:
                hashes = list(pool.map(pixel_hash, split.paths))
            while len(_RECENT) >= 8:
                _RECENT.pop(next(iter(_RECENT)))
            _RECENT[key] = hashes
        return _RECENT[key]
    if isinstance(split, Split):
        return [hashlib.sha256(img.contiguous().numpy().tobytes()).hexdigest() for img in split.images]
    if hasattr(split, "image_bytes"):  # records: their images, verified and hashed once (verify_records, below)
        return verify_records(split)
    if hasattr(split, "query") and hasattr(split, "index"):  # queries and their gallery (containers.QueryIndex)
        return content_hashes(split.query) + content_hashes(split.index)
    if hasattr(split, "images") and hasattr(split, "text_embeddings"):  # a TextProbe: its images
        return content_hashes(split.images)
    raise TypeError(f"cannot hash a {type(split).__name__}")


def _name(split, i: int) -> str:
    if hasattr(split, "query") and hasattr(split, "index"):
        nq = len(split.query)
        return f"query {_name(split.query, i)}" if i < nq else f"index {_name(split.index, i - nq)}"
    if isinstance(split, FileSplit):
        return split.paths[i]
    return f"record {split.keys[i]}" if getattr(split, "keys", None) else f"image {i}"


def shared_images(a, b, hashes: dict | None = None) -> list[tuple[str, str]]:
    """(item of a, item of b) pairs with the same content. hashes: a cache {id(split): its content hashes}."""
    hashes = {} if hashes is None else hashes
    for s in (a, b):
        if id(s) not in hashes:
            hashes[id(s)] = content_hashes(s)
    first = {}
    for i, h in enumerate(hashes[id(a)]):
        first.setdefault(h, i)
    return [(_name(a, first[h]), _name(b, j)) for j, h in enumerate(hashes[id(b)]) if h in first]


def shared_classes(train, other, label_space: str = "auto") -> tuple[str, list]:
    """(how they were compared: "name" | "id" | "", the classes of `other` also in `train`)."""
    names = lambda s: getattr(s, "class_names", None) or []
    if label_space == "per_split":
        return "", []
    if label_space == "auto" and names(train) and names(other):
        used = lambda s: {names(s)[int(l)] for l in np.unique(s.labels) if 0 <= int(l) < len(names(s))}
        return "name", sorted(used(train) & used(other))
    if label_space == "shared" or not (names(train) or names(other)):
        return "id", np.intersect1d(np.unique(train.labels), np.unique(other.labels)).tolist()
    return "", []


def check_domains(domains, where: str, allowed: bool = False, label_space: str = "auto") -> None:
    """Raise ValueError on leakage between the splits of an experiment's Domains (unless allowed)."""
    if allowed:
        return
    if label_space not in LABEL_SPACES:
        raise ValueError(f"{where} [data] label_space = {label_space!r} must be one of {list(LABEL_SPACES)}")
    problems, hashes = [], {}
    pairs = [("target", "train", domains.target_train, "val", domains.target_val),
             ("target", "train", domains.target_train, "test", domains.target_test),
             ("target", "val", domains.target_val, "test", domains.target_test),
             ("generic", "train", domains.generic_train, "val", domains.generic_val),
             ("generic", "train", domains.generic_train, "test", domains.generic_test)]
    for group, an, a, bn, b in pairs:
        same = shared_images(a, b, hashes)
        if same:
            eg = "; ".join(f"{x} = {y}" for x, y in same[:3])
            problems.append(f"{len(same)} image(s) of [data.{group}] {bn} are also in {an} (same pixels), e.g. {eg}")
    if getattr(domains, "merged_index", False):
        same = shared_images(domains.target_test, domains.generic_test, hashes)
        if same:
            eg = "; ".join(f"{x} = {y}" for x, y in same[:3])
            problems.append(f"{len(same)} image(s) of [data.generic] test are also in [data.target] test (same "
                            f"pixels), e.g. {eg}: merged_index = true puts both tests in one index, where each would "
                            "be twice under two domains' labels (give the two tests different images)")
    images_leak = bool(problems)
    for bn, b in (("val", domains.target_val), ("test", domains.target_test)):
        how, common = shared_classes(domains.target_train, b, label_space)
        if common:
            what = "class name(s)" if how == "name" else "class id(s)"
            fix = ('if these are per-split numbers, not the same classes, set [data] label_space = "per_split"'
                   if how == "id" else 'if equal names are different classes, set [data] label_space = "per_split"')
            problems.append(f"{len(common)} {what} of [data.target] train are also in {bn}, e.g. {common[:5]}: "
                            f"open-set retrieval evaluates on classes training never saw (give the splits disjoint "
                            f"classes; {fix})")
    if problems:
        raise ValueError(f"{where}: the data leak between splits:\n  " + "\n  ".join(problems) +
                         "\nFix the splits" + (", or set [data] allow_leakage = true to run anyway (it turns off both "
                                               "checks; the numbers then no longer measure what README says they do)."
                                               if images_leak else "."))


def verify_records(split) -> list[str]:
    """Decode every image of a records split (records.RecordSplit); their pixel hashes, kept on the split."""
    cached = getattr(split, "_pixel_hashes", None)
    if cached is not None and len(cached) == len(split):
        return cached
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
