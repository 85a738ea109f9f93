"""The data formats a config's data part may name (one `Format` row of `FORMATS` each: the keys it takes besides
format/path/root, with their types, and its reader), the typed-key checks every table of a config file goes
through (`check_table`), and `read_split`: one split a checked config names. config.py (experiment files),
testsets.py (extra test sets) and study.py read through here.

Add a format: a reader `read(part, size) -> split` and one row of FORMATS (CONTRIBUTING.md, "Where each kind of row
goes"; tests/test_recipes.py follows the recipe)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..datasets import data as D
from ..models import config_image_size as _model_size

# key: (type, check or None, what is expected). Types: bool, int, float (an int is accepted), str.
_POS_INT = (int, lambda v: v >= 1, "an integer >= 1")
_NONNEG_INT = (int, lambda v: v >= 0, "an integer >= 0")
_STR = (str, lambda v: bool(v), "a non-empty string")
_BOOL = (bool, None, "true or false")


@dataclass(frozen=True)
class Format:
    """A dataset format of a config's data part: the keys it takes besides format/path/root (with their types) and
    its reader: read(part, size) -> a split (data.FileSplit, records.RecordSplit); `files`: its keys that name files
    (resolved and checked like path)."""
    keys: dict
    read: Callable
    files: tuple = ()


def _skip(part):
    return part.get("skip_unreadable", False)


def _generic_folder(part, size):
    train, val = D.generic_folder(part["path"], size, part.get("seed", 0), part.get("val_fraction", 0.2),
                                  part.get("max_per_class"), _skip(part))
    return train if part.get("part", "train") == "train" else val


FORMATS = {
    "image_folder": Format({"max_per_class": _POS_INT, "skip_unreadable": _BOOL},
                           lambda p, size: D.image_folder(p["path"], size, p.get("max_per_class"), _skip(p))),
    "split_file": Format({"skip_unreadable": _BOOL},
                         lambda p, size: D.split_file(p["path"], size, p.get("root"), _skip(p))),
    "csv": Format({"skip_unreadable": _BOOL}, lambda p, size: D.csv_split(p["path"], size, p.get("root"), _skip(p))),
    "generic_folder": Format({"part": (str, lambda v: v in ("train", "val"), "'train' or 'val'"),
                              "seed": _NONNEG_INT, "max_per_class": _POS_INT, "skip_unreadable": _BOOL,
                              "val_fraction": (float, lambda v: 0 < v < 1, "a number in (0, 1)")}, _generic_folder),
    "caption_csv": Format({}, lambda p, size: D.caption_csv(p["path"], size, p.get("root"))),
    "karpathy_json": Format({"split": _STR}, lambda p, size: D.karpathy_json(p["path"], size,
                                                                             p.get("root") or Path(p["path"]).parent,
                                                                             p.get("split", "test"))),
}
SIDE_FILES = (".json", ".txt", ".md", ".npy", ".csv")  # beside the release's shards (e.g. *_info_data.json)


def _record_files(path: str) -> list[str]:
    p = Path(path)  # a file, or a folder's files but hidden and side files
    return sorted(str(f) for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and
                  f.suffix.lower() not in SIDE_FILES) if p.is_dir() else [str(p)]


def _records(kind: str):
    """A records format: path = one file or a folder of them; keys = a JSON list of the record keys to take (or
    of {"key": ...} objects), in that order; label / image / key: the feature names."""
    def read(part, size):
        import json

        from ..datasets.precheck import verify_records
        from ..datasets.records import record_split
        files = _record_files(part["path"])
        keys = None
        if "keys" in part:
            listed = json.loads(Path(part["keys"]).read_text())
            if not isinstance(listed, list):
                raise ValueError(f"{part['keys']}: keys must be a JSON list of record keys (or of {{\"key\": ...}})")
            keys = [k["key"] if isinstance(k, dict) else k for k in listed]
        split = record_split(files, size, kind, part.get("label", "class_id"), part.get("key", "key"),
                             part.get("image", "image_bytes"), keys)
        verify_records(split)  # every image decoded now, not in a DataLoader worker mid-training
        return split
    return Format({"keys": _STR, "label": _STR, "image": _STR, "key": _STR}, read, files=("keys",))


FORMATS["array_record"] = _records("array_record")  # the paper's release (ArrayRecord shards of tf.train.Example)
FORMATS["tfrecord"] = _records("tfrecord")          # the same records in TFRecord files


def _text_probe(part, size):
    from ..datasets.precheck import verify_records
    from ..datasets.textprobe import text_probe
    probe = text_probe(_record_files(part["path"]), part["embeddings"], part["gt"], size, None,
                       part.get("image", "bytes_image"), part.get("id", "id"))
    verify_records(probe.images)
    return probe


# the paper's image-text test sets: query images in records, precomputed text embeddings and the ground truth
FORMATS["text_embeddings"] = Format({"embeddings": _STR, "gt": _STR, "image": _STR, "id": _STR}, _text_probe,
                                    files=("embeddings", "gt"))


def read_split(cfg: dict, group: str, part: str):
    """One split a checked config names ([data.GROUP] PART, e.g. "target", "test"), at the model's image size."""
    mc, d, where = cfg["model"], cfg["data"], cfg.get("_path", "the config")
    size = d.get("size") or mc.get("image_size") or _model_size(mc["name"])
    if "query" in d[group][part]:  # a test split of queries against a separate index (gallery)
        from ..datasets.containers import QueryIndex
        read = lambda sub: FORMATS[sub["format"]].read(sub, size)
        return QueryIndex(read(d[group][part]["query"]), read(d[group][part]["index"]))
    try:
        return FORMATS[d[group][part]["format"]].read(d[group][part], size)
    except ValueError as e:  # the library's hint, in this file's terms
        raise ValueError(f"{where} [data.{group}.{part}]: " + str(e).replace(
            "pass skip_unreadable=True to leave them out (counted in .skipped)",
            f"set skip_unreadable = true in [data.{group}] {part} = {{...}} to leave them out (with a warning)")) from None


def check_table(section, allowed: dict, where: str, required: set = frozenset()) -> None:
    """Unknown keys, missing keys and values of the wrong type or range are errors naming file, table and key."""
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a table (key = value pairs), got {section!r}")
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(set(required) - set(section))
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    for key, spec in allowed.items():
        if key in section and spec is not None:
            check_value(section[key], spec, f"{where} {key}")


def check_value(value, spec: tuple, where: str) -> None:
    kind, ok, expected = spec
    good_type = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float else \
        (isinstance(value, int) and not isinstance(value, bool)) if kind is int else isinstance(value, kind)
    if not good_type or (ok is not None and not ok(value)):
        got = f"{value!r} ({'a TOML string' if isinstance(value, str) else type(value).__name__})"
        raise ValueError(f"{where} = {got} must be {expected}"
                         + ("; write true or false without quotes" if kind is bool and isinstance(value, str) else "")
                         + ("; write the number without quotes" if kind in (int, float) and isinstance(value, str) else ""))
