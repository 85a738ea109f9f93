"""The paper's released training data, read without TensorFlow: `tf.train.Example` records (`image_bytes`,
`class_id`, `key`) in ArrayRecord shards (the official release) or TFRecord files.

  tf.train.Example = {features (1): Features}; Features = {feature (1): map<string, Feature>}
  Feature = oneof {bytes_list (1), float_list (2), int64_list (3)}, each {repeated value (1)}
  (protobuf wire format: a key varint (field << 3 | wire type), then a varint, 8/4 bytes, or a length-delimited
  payload; numeric lists are usually packed, and both packed and unpacked are read)
  TFRecord file = records of: uint64 length, uint32 masked_crc32c(length), data, uint32 masked_crc32c(data),
  masked_crc32c(x) = ((c >> 15) | (c << 17)) + 0xa282ead8 mod 2^32, c = crc32c(x)

`RecordSplit` is a split like `data.FileSplit` (`len`, `.labels`, `.take(idx)` -> uint8 (B, 3, S, S),
`.fingerprint()`): it indexes the records once (which file, which record, its class and key) and decodes the images
of a batch on demand, in the loader's workers (readers open lazily in each process).
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

RECORD_KINDS = ("array_record", "tfrecord")


# ---------------------------------------------------------------------------- tf.train.Example
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated protobuf varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
            if i > len(buf):
                raise ValueError("truncated protobuf field")
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf: bytes) -> list:
    for kind, _, payload in _fields(buf):
        out = []
        for number, wire, v in _fields(payload):
            if number != 1:
                continue
            if kind == 1:
                out.append(bytes(v))
            elif kind == 2:
                out += list(struct.unpack(f"<{len(v) // 4}f", v)) if wire == 2 else [struct.unpack("<f", v)[0]]
            elif kind == 3:
                if wire == 2:
                    j = 0
                    while j < len(v):
                        x, j = _varint(v, j)
                        out.append(_signed(x))
                else:
                    out.append(_signed(v))
        return out
    return []


def parse_example(buf: bytes) -> dict[str, list]:
    """A serialised tf.train.Example as {name: list of bytes / floats / ints}."""
    out = {}
    for number, _, features in _fields(buf):
        if number != 1:
            continue
        for n, _, entry in _fields(features):
            if n != 1:
                continue
            key, value = None, b""
            for m, _, v in _fields(entry):
                if m == 1:
                    key = bytes(v).decode()
                elif m == 2:
                    value = v
            out[key] = _feature(value)
    return out


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


def encode_example(features: dict) -> bytes:
    """The inverse of `parse_example` (packed numeric lists): {name: bytes | str | int | float | list of one kind}."""
    entries = b""
    for name, values in features.items():
        values = values if isinstance(values, list) else [values]
        if all(isinstance(v, (bytes, str)) for v in values):
            inner = b"".join(_delimited(1, v.encode() if isinstance(v, str) else v) for v in values)
            feature = _delimited(1, inner)
        elif all(isinstance(v, int) for v in values):
            feature = _delimited(3, _delimited(1, b"".join(_encode_varint(v) for v in values)))
        elif all(isinstance(v, (int, float)) for v in values):
            feature = _delimited(2, _delimited(1, struct.pack(f"<{len(values)}f", *values)))
        else:
            raise ValueError(f"feature {name!r}: values must be all bytes/str, all int or all float, got {values!r}")
        entries += _delimited(1, _delimited(1, name.encode()) + _delimited(2, feature))
    return _delimited(1, entries)


# ---------------------------------------------------------------------------- TFRecord files
def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord uses it (google_crc32c's C code when installed)."""
    try:
        import google_crc32c
        return google_crc32c.value(bytes(data))
    except ImportError:
        c = 0xFFFFFFFF
        for b in data:
            c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
        return c ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tfrecord(path: str | Path, records: list[bytes]) -> None:
    with open(path, "wb") as f:
        for r in records:
            n = struct.pack("<Q", len(r))
            f.write(n + struct.pack("<I", masked_crc(n)) + r + struct.pack("<I", masked_crc(r)))


def tfrecord_offsets(path: str | Path) -> list[tuple[int, int]]:
    """(offset, length) of every record's data, each length's checksum checked (a damaged file is named)."""
    out, size = [], os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                raise ValueError(f"{path}: truncated TFRecord header at byte {pos}")
            n, crc = struct.unpack("<QI", head)
            if masked_crc(head[:8]) != crc:
                raise ValueError(f"{path}: corrupt TFRecord length at byte {pos} (not a TFRecord file?)")
            out.append((pos + 12, n))
            pos += 12 + n + 4
            if pos > size:
                raise ValueError(f"{path}: record at byte {out[-1][0] - 12} runs past the end of the file")
            f.seek(pos)
    return out


def read_tfrecord(path: str | Path, offset: int, length: int, verify: bool = True) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data, crc = f.read(length), struct.unpack("<I", f.read(4))[0]
    if verify and masked_crc(data) != crc:
        raise ValueError(f"{path}: corrupt TFRecord data at byte {offset}")
    return data


# ---------------------------------------------------------------------------- ArrayRecord shards
def _array_record():
    try:
        from array_record.python import array_record_module
    except ImportError:
        raise ImportError("ArrayRecord shards need the array-record package: pip install 'infusing_kit[paper]' "
                          "(or pip install array-record)") from None
    return array_record_module


def write_array_record(path: str | Path, records: list[bytes]) -> None:
    w = _array_record().ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()


def array_record_count(path: str | Path) -> int:
    module = _array_record()
    try:
        r = module.ArrayRecordReader(str(path))
        try:
            return r.num_records()
        finally:
            r.close()
    except (RuntimeError, ValueError, OSError) as e:  # Riegeli's own words name no file
        raise ValueError(f"{path}: not a readable ArrayRecord shard ({str(e) or 'no detail'}); it may be truncated or "
                         "another format: copy it again from the release") from None


# ---------------------------------------------------------------------------- the split
@dataclass
class RecordSplit:
    """Records (file, position) with integer labels and keys, decoded on demand to uint8 (3, size, size)."""
    files: list[str]
    kind: str                                  # "array_record" or "tfrecord"
    where: list[tuple[int, int, int]]          # per item: (file index, record index or offset, length)
    labels: np.ndarray
    size: int
    keys: list[str] = field(default_factory=list)
    image_feature: str = "image_bytes"
    captions: list[str] = field(default_factory=list)
    caption_image: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.kind not in RECORD_KINDS:
            raise ValueError(f"RecordSplit.kind must be one of {RECORD_KINDS}, got {self.kind!r}")
        if len(self.where) != len(self.labels):
            raise ValueError(f"RecordSplit has {len(self.where)} records but {len(self.labels)} labels")
        self._readers: dict = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):  # readers are opened again in each worker process
        return {k: v for k, v in self.__dict__.items() if k not in ("_readers", "_pixel_hashes")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._readers = {}

    def record(self, i: int) -> dict[str, list]:
        f, pos, length = self.where[int(i)]
        if self.kind == "tfrecord":
            return parse_example(read_tfrecord(self.files[f], pos, length))
        if f not in self._readers:
            self._readers[f] = _array_record().ArrayRecordReader(self.files[f])
        return parse_example(self._readers[f].read([pos])[0])

    def image_bytes(self, i: int) -> bytes:
        rec = self.record(i)
        if not rec.get(self.image_feature):
            raise ValueError(f"record {self.name(i)} of {self.files[self.where[int(i)][0]]} has no "
                             f"{self.image_feature!r} feature (it has {sorted(rec)}); set the config's image = ...")
        return rec[self.image_feature][0]

    def name(self, i: int) -> str:
        return self.keys[int(i)] if self.keys else str(int(i))

    def take(self, idx) -> torch.Tensor:
        from .data import read_image
        return torch.stack([read_image(self.image_bytes(i), self.size, name=f"record {self.name(i)}")
                            for i in np.asarray(idx).reshape(-1)])

    def rows(self, start: int, stop: int) -> "RecordSplit":
        return RecordSplit(self.files, self.kind, self.where[start:stop], self.labels[start:stop], self.size,
                           self.keys[start:stop], self.image_feature)

    def fingerprint(self) -> str:
        """sha256 of the files (names, sizes, modification times), the records taken, labels and output size."""
        from .data import file_stamps
        h = hashlib.sha256(f"{self.kind}|{self.size}|{len(self.where)}".encode())
        h.update(file_stamps(self.files))
        h.update(np.asarray(self.where, dtype=np.int64).tobytes())
        h.update(self.labels.tobytes())
        h.update("\n".join(self.captions).encode())
        return h.hexdigest()[:16]


def record_split(paths: list[str | Path], size: int, kind: str | None = None, label_feature: str | None = "class_id",
                 key_feature: str = "key", image_feature: str = "image_bytes", keys: list[str] | None = None) -> RecordSplit:
    """Index record files (ArrayRecord shards or TFRecord files, by extension unless `kind` says) into a split:
    every record's class (`label_feature`; None: records without classes, labelled 0, 1, ...) and key (bytes or
    an integer, kept as text); `keys` (e.g. a split JSON's) keeps only those records, in that order. Each record
    is read once here (labels and keys), images are decoded later."""
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("record_split needs at least one record file")
    files, where, labels, names, where_kind = [], [], [], [], None
    for p in paths:
        k = kind or ("tfrecord" if p.endswith((".tfrecord", ".tfrecords")) or ".tfrecord-" in p else "array_record")
        if k not in RECORD_KINDS:
            raise ValueError(f"{p}: record kind must be one of {RECORD_KINDS}, got {k!r}")
        if where_kind is not None and k != where_kind:
            raise ValueError(f"{p}: a split reads one kind of record file (found {where_kind} and {k})")
        where_kind, f = k, len(files)
        files.append(p)
        if k == "tfrecord":
            positions = tfrecord_offsets(p)
            raw = (read_tfrecord(p, o, n) for o, n in positions)
        else:
            n = array_record_count(p)
            positions = [(j, 0) for j in range(n)]
            reader = _array_record().ArrayRecordReader(p)
            raw = _read_all(reader, n, p)
        for (pos, length), data in zip(positions, raw):
            rec = parse_example(data)
            if label_feature is not None and not rec.get(label_feature):
                raise ValueError(f"{p}: a record has no {label_feature!r} (features: {sorted(rec)})")
            where.append((f, pos, length))
            labels.append(int(rec[label_feature][0]) if label_feature is not None else len(labels))
            names.append(_text(rec[key_feature][0]) if rec.get(key_feature) else f"{Path(p).name}:{pos}")
        if k != "tfrecord":
            reader.close()  # (the split opens its own readers to decode images)
    if keys is not None:
        at = {k: i for i, k in enumerate(names)}
        missing = [k for k in keys if k not in at]
        if missing:
            raise ValueError(f"{len(missing)} keys of the split are in none of the record files (first: {missing[:3]})")
        order = [at[k] for k in keys]
        where, labels, names = [where[i] for i in order], [labels[i] for i in order], list(keys)
    return RecordSplit(files, where_kind, where, labels, size, names, image_feature)


def _read_all(reader, n: int, path: str):
    for j in range(n):
        try:
            yield reader.read([j])[0]
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: record {j} cannot be read ({str(e) or 'no detail'}); the shard may be truncated "
                             "or damaged: copy it again") from None


def _text(v) -> str:
    """An id as text: bytes decoded, numbers written out (ids are matched as text across files)."""
    return v.decode() if isinstance(v, bytes) else str(v)
