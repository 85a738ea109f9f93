"""The paper's released data format, read without TensorFlow: tf.train.Example records in ArrayRecord shards and
TFRecord files. Every record the tests write comes back (image bytes, class, key); a config on ArrayRecord shards
runs the same experiment as the same images in split files."""
import json

import numpy as np
import pytest

from infusing_kit import records as R


def test_examples_round_trip_every_feature_kind():
    feats = {"image_bytes": b"\x00\xffpng", "class_id": 11317, "key": "cars/00042.jpg", "big": [-1, 2 ** 40, 0],
             "score": [0.5, -2.25], "names": ["a", "bc"]}
    got = R.parse_example(R.encode_example(feats))
    assert got == {"image_bytes": [b"\x00\xffpng"], "class_id": [11317], "key": [b"cars/00042.jpg"],
                   "big": [-1, 2 ** 40, 0], "score": [0.5, -2.25], "names": [b"a", b"bc"]}
    # an unpacked int64 list (a writer may emit one value per field) reads the same as a packed one
    unpacked = b"".join(R._key(1, 0) + R._encode_varint(v) for v in (3, 4))  # Int64List, one field per value
    entry = R._delimited(1, b"class_id") + R._delimited(2, R._delimited(3, unpacked))
    assert R.parse_example(R._delimited(1, R._delimited(1, entry))) == {"class_id": [3, 4]}
    with pytest.raises(ValueError, match="truncated"):
        R.parse_example(R.encode_example(feats)[:-3])


def test_crc32c_matches_the_standard_check_value():
    assert R.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)


def _records(n):
    rng = np.random.default_rng(0)
    return [{"image_bytes": rng.bytes(int(rng.integers(10, 200))), "class_id": int(i % 3), "key": f"k{i:03d}"}
            for i in range(n)]


@pytest.mark.parametrize("kind, ext", [("array_record", "array_record"), ("tfrecord", "tfrecord")])
def test_every_record_comes_back_from_both_file_kinds(tmp_path, kind, ext):
    recs = _records(7)
    files = [tmp_path / f"part-{i}.{ext}" for i in range(2)]
    write = R.write_array_record if kind == "array_record" else R.write_tfrecord
    write(files[0], [R.encode_example(r) for r in recs[:4]])
    write(files[1], [R.encode_example(r) for r in recs[4:]])
    split = R.record_split(files, size=32)
    assert split.kind == kind and len(split) == 7 and split.keys == [r["key"] for r in recs]
    assert split.labels.tolist() == [r["class_id"] for r in recs]
    assert all(split.image_bytes(i) == r["image_bytes"] for i, r in enumerate(recs))
    chosen = R.record_split(files, size=32, keys=["k005", "k001"])  # a split file's keys, in its order
    assert chosen.keys == ["k005", "k001"] and chosen.image_bytes(0) == recs[5]["image_bytes"]
    with pytest.raises(ValueError, match="1 keys of the split are in none of the record files"):
        R.record_split(files, size=32, keys=["k001", "nope"])


def test_a_damaged_tfrecord_file_is_named(tmp_path):
    path = tmp_path / "x.tfrecord"
    R.write_tfrecord(path, [R.encode_example(r) for r in _records(3)])
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0xFF  # inside the first record's data
    path.write_bytes(bytes(raw))
    offsets = R.tfrecord_offsets(path)  # lengths are intact
    with pytest.raises(ValueError, match="corrupt TFRecord data at byte 12"):
        R.read_tfrecord(path, *offsets[0])
    raw[0] ^= 0xFF  # the first length
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{path}: corrupt TFRecord length at byte 0"):
        R.tfrecord_offsets(path)


@pytest.mark.slow
def test_a_config_on_array_record_shards_runs_the_same_experiment_as_split_files(smoke_study, tmp_path):
    from infusing_kit.config import run_config
    world = smoke_study.parents[1]
    text = (world / "configs" / "toy-naive.toml").read_text().replace('schedule = "smoke"', 'schedule = "smoke"\nsteps = 12')
    shards = world / "shards"
    shards.mkdir(exist_ok=True)
    lines = {}
    for part in ("train", "val", "test"):
        items = json.loads((world / "target" / f"{part}.json").read_text())
        recs = [R.encode_example({"image_bytes": (world / it["path"]).read_bytes(), "class_id": it["class_id"],
                                  "key": it["path"]}) for it in items]
        (shards / part).mkdir(exist_ok=True)
        half = len(recs) // 2  # two shards, as the release has many
        R.write_array_record(shards / part / "a-00000.array_record", recs[:half])
        R.write_array_record(shards / part / "a-00001.array_record", recs[half:])
        (shards / f"{part}-keys.json").write_text(json.dumps([{"key": it["path"]} for it in items]))
        old = f'{part} = {{format = "split_file", path = "target/{part}.json", root = "."}}'
        assert old in text
        lines[old] = f'{part} = {{format = "array_record", path = "shards/{part}", keys = "shards/{part}-keys.json"}}'
    files_cfg, records_cfg = world / "configs" / "naive-files.toml", world / "configs" / "naive-records.toml"
    files_cfg.write_text(text)
    for old, new in lines.items():
        text = text.replace(old, new)
    records_cfg.write_text(text)
    a = run_config(files_cfg, tmp_path / "files", progress=False)
    b = run_config(records_cfg, tmp_path / "records", progress=False)
    assert a["pretrained"] == b["pretrained"] and a["finetuned"] == b["finetuned"] and a["best_step"] == b["best_step"]
    assert b["config"]["data"]["target"]["train"]["format"] == "array_record"
