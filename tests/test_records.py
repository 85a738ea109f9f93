"""The paper's released data format, read without TensorFlow: tf.train.Example records in ArrayRecord shards and
TFRecord files. Every record the tests write comes back (image bytes, class, key); a config on ArrayRecord shards
runs the same experiment as the same images in split files."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from infusing_kit.datasets import records as R
from infusing_kit.datasets.textprobe import text_probe


def test_examples_round_trip_every_feature_kind():
    feats = {"image_bytes": b"\x00\xffpng", "class_id": 11317, "key": "cars/00042.jpg", "big": [-1, 2 ** 40, 0],
             "score": [0.5, -2.25], "names": ["a", "bc"]}
    got = R.parse_example(R.encode_example(feats))
    assert got == {"image_bytes": [b"\x00\xffpng"], "class_id": [11317], "key": [b"cars/00042.jpg"],
                   "big": [-1, 2 ** 40, 0], "score": [0.5, -2.25], "names": [b"a", b"bc"]}
    # an unpacked int64 list (a writer may emit one value per field) reads the same as a packed one
    # (written by hand from the protobuf wire format, not by the kit's encoder: field n, wire type 2 = n << 3 | 2)
    field = lambda n, payload: bytes([n << 3 | 2, len(payload)]) + payload
    unpacked = b"\x08\x03\x08\x04"  # Int64List.value = 3, then 4: field 1, wire type 0 (varint), one per value
    entry = field(1, b"class_id") + field(2, field(3, unpacked))
    assert R.parse_example(field(1, field(1, entry))) == {"class_id": [3, 4]}
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


@pytest.mark.parametrize("kind, ext", [("array_record", "array_record"), ("tfrecord", "tfrecord")])
def test_training_batches_from_records_come_from_fork_server_workers_after_the_main_process_read_them(tmp_path, kind,
                                                                                                       ext):
    """CI's full session twice had a training DataLoader worker segfault on ArrayRecord shards: the training stream
    wraps its domains in one loader dataset, and the fork-server rule looked at the split alone, so training
    workers were forked with the main process's open readers. Here the main process reads first (as evaluation and
    the pre-check do), then the training stream decodes in a worker: the same pixels, from a fork-server worker."""
    from infusing_kit.datasets import sampling
    write = R.write_array_record if kind == "array_record" else R.write_tfrecord
    import io

    from PIL import Image
    pngs = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    write(tmp_path / f"part.{ext}", [R.encode_example({"image_bytes": b, "class_id": i % 3, "key": f"k{i}"})
                                     for i, b in enumerate(pngs)])
    split = R.record_split([tmp_path / f"part.{ext}"], size=32)
    direct = split.take(list(range(6)))  # opens the reader here, in the main process
    assert sampling._records(sampling._Domains((split, None)))
    got = list(sampling.batches((split, None), "target_only", 0, 2, 3, workers=1))
    assert [s for s, *_ in got] == [0, 1, 2]
    for _, d, idx, images in got:
        assert d == 0 and torch.equal(images, direct[idx])


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
    from infusing_kit.protocol.config import run_config
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


@pytest.mark.slow
def test_the_papers_release_and_test_protocols_run_end_to_end_from_a_config(smoke_study, tmp_path):
    """What the official release holds, written here from the exported world: the fine-grained train/val splits as
    ArrayRecord shards named by split JSONs, the test split as queries against a separate gallery (InShop's
    test -> index), and the image-text set as query records with precomputed text embeddings and a ground truth
    (Flickr30k's files). `experiment --config` runs it with the merged-index protocol too, and every number is the
    same as computed by hand from the run's model (image-text: equal to the text tower's own captions)."""
    import csv

    from infusing_kit.__main__ import main
    from infusing_kit.teaching.chapters import load_run
    from infusing_kit.metrics import image_text_recall, merged_retrieval_metrics, retrieval_metrics
    from infusing_kit.models import embed_images, embed_texts, load_model
    world = smoke_study.parents[1]
    text = (world / "configs" / "toy-naive.toml").read_text().replace('schedule = "smoke"', 'schedule = "smoke"\nsteps = 12')
    rel = tmp_path / "release"
    for part in ("train", "val"):  # ArrayRecord shards of tf.train.Example records, named by a split JSON
        items = json.loads((world / "target" / f"{part}.json").read_text())
        (rel / part).mkdir(parents=True)
        R.write_array_record(rel / part / "s-00000.array_record", [R.encode_example(
            {"image_bytes": (world / it["path"]).read_bytes(), "class_id": it["class_id"], "key": it["path"]})
            for it in items])
        (rel / f"{part}.json").write_text(json.dumps([{"key": it["path"]} for it in items]))
        old = f'{part} = {{format = "split_file", path = "target/{part}.json", root = "."}}'
        text = text.replace(old, f'{part} = {{format = "array_record", path = "{rel / part}", keys = "{rel / part}.json"}}')
    test = json.loads((world / "target" / "test.json").read_text())  # one query per class, the rest its gallery
    first = {}
    for i, it in enumerate(test):
        first.setdefault(it["class_id"], i)
    query = [it for i, it in enumerate(test) if first[it["class_id"]] == i]
    index = [it for i, it in enumerate(test) if first[it["class_id"]] != i]
    for name, items in (("query", query), ("index", index)):
        (rel / f"test-{name}.json").write_text(json.dumps(items))
    old = 'test = {format = "split_file", path = "target/test.json", root = "."}'
    assert old in text
    text = text.replace(old, f'test = {{query = {{format = "split_file", path = "{rel}/test-query.json", root = "{world}"}}, '
                             f'index = {{format = "split_file", path = "{rel}/test-index.json", root = "{world}"}}}}')
    rows = list(csv.DictReader(open(world / "text" / "test.csv")))  # image-text: records, embeddings, ground truth
    images = list(dict.fromkeys(r["image"] for r in rows))
    R.write_tfrecord(rel / "queries.tfrecord", [R.encode_example({"bytes_image": (world / p).read_bytes(), "id": i})
                                                for i, p in enumerate(images)])
    model_cfg = json.loads(json.dumps(__import__("tomllib").loads(text)["model"]))
    vlm = load_model(model_cfg["name"], str((world / "configs" / model_cfg["pretrained"]).resolve()))
    captions = [r["caption"] for r in rows]
    emb = embed_texts(vlm, captions, progress=False)
    np.save(rel / "texts.npy", {f"c{j}": emb[j] for j in range(len(rows))}, allow_pickle=True)
    np.save(rel / "gt.npy", {i: [f"c{j}" for j, r in enumerate(rows) if r["image"] == p] for i, p in enumerate(images)},
            allow_pickle=True)
    old = 'test = {format = "caption_csv", path = "text/test.csv", root = "."}'
    assert old in text
    text = text.replace(old, f'test = {{format = "text_embeddings", path = "{rel}/queries.tfrecord", '
                             f'embeddings = "{rel}/texts.npy", gt = "{rel}/gt.npy"}}')
    text = text.replace("[data]\n", "[data]\nmerged_index = true\n")
    cfg = world / "configs" / "naive-release.toml"
    cfg.write_text(text)
    assert main(["experiment", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run")
    m, tuned, pretrained, data = run
    for when, model in (("pretrained", pretrained), ("finetuned", tuned)):
        q, x = embed_images(model, data.target_test.query, progress=False), embed_images(model, data.target_test.index, progress=False)
        want = retrieval_metrics(q, data.target_test.query.labels, x, data.target_test.index.labels)
        assert m[when]["in_domain"]["map@20"] == pytest.approx(want["map@20"], abs=1e-9)
        g = embed_images(model, data.generic_test, progress=False)
        merged = merged_retrieval_metrics({"in_domain": (q, data.target_test.query.labels, x, data.target_test.index.labels),
                                           "generic_image": (g, data.generic_test.labels, None, None)})
        assert m[when]["merged"]["in_domain/map@20"] == pytest.approx(merged["in_domain"]["map@20"], abs=1e-9)
        assert m[when]["merged"]["generic_image/map@20"] == pytest.approx(merged["generic_image"]["map@20"], abs=1e-9)
        pairs = embed_images(model, data.text_test, progress=False)  # the text tower's own captions, same images
        by_tower = image_text_recall(pairs, embed_texts(model, captions, progress=False),
                                     [images.index(r["image"]) for r in rows])
        assert m[when]["image_text"] == pytest.approx(by_tower, abs=1e-9)
    assert 0 < len(data.target_test.query) < len(data.target_test.index)
    assert m["finetuned"]["in_domain"]["map@20"] > m["pretrained"]["in_domain"]["map@20"]


def test_a_text_probe_with_a_hole_names_the_file(tmp_path):
    """Precomputed text embeddings: the captions of each image in ground-truth order; a caption without an embedding
    or an image without a ground truth is an error naming the file (nothing is silently left out)."""
    png = _png()
    R.write_tfrecord(tmp_path / "q.tfrecord", [R.encode_example({"bytes_image": png, "id": i}) for i in range(3)])
    emb = {f"c{j}": np.full(4, j, np.float32) for j in range(5)}
    np.save(tmp_path / "e.npy", emb, allow_pickle=True)
    np.save(tmp_path / "gt.npy", {0: ["c0", "c1"], 1: ["c2"], 2: ["c3", "c4"]}, allow_pickle=True)
    probe = text_probe([tmp_path / "q.tfrecord"], tmp_path / "e.npy", tmp_path / "gt.npy", 8)
    assert probe.caption_image.tolist() == [0, 0, 1, 2, 2] and probe.caption_ids == ["c0", "c1", "c2", "c3", "c4"]
    assert probe.text_embeddings[:, 0].tolist() == [0, 1, 2, 3, 4] and tuple(probe.take([1]).shape) == (1, 3, 8, 8)
    np.save(tmp_path / "gt2.npy", {0: ["c0"], 1: ["c9"], 2: ["c3"]}, allow_pickle=True)
    with pytest.raises(ValueError, match="e.npy: 1 captions"):
        text_probe([tmp_path / "q.tfrecord"], tmp_path / "e.npy", tmp_path / "gt2.npy", 8)
    np.save(tmp_path / "gt3.npy", {0: ["c0"], 1: ["c1"]}, allow_pickle=True)
    with pytest.raises(ValueError, match="gt3.npy: image '2'"):
        text_probe([tmp_path / "q.tfrecord"], tmp_path / "e.npy", tmp_path / "gt3.npy", 8)


def _png() -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_records_folder_reads_its_shards_not_the_side_files_the_release_keeps_beside_them(tmp_path):
    from infusing_kit.protocol.formats import _record_files
    for name in ("imagenet.train_info_data.json", "sop.array_record-00000-of-00002", "sop.array_record-00001-of-00002",
                 ".hidden", "README.md"):
        (tmp_path / name).write_bytes(b"x")
    assert [Path(f).name for f in _record_files(str(tmp_path))] == ["sop.array_record-00000-of-00002",
                                                                  "sop.array_record-00001-of-00002"]
    assert _record_files(str(tmp_path / "one.tfrecord")) == [str(tmp_path / "one.tfrecord")]
