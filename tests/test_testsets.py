"""Several test sets per run (testsets.py): a config's [data.tests.NAME] tables are checked like every other data part
and refused with the file, the key and what to do; the exported world names a second generic test domain; and a run
reports each extra set's metrics and the mean over datasets, every number equal to one computed here by hand from
the run's models, while the keys a run without extra test sets writes stay the same to the last bit."""
import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from infusing_kit.protocol.config import load_config, setup_from_config
from infusing_kit.protocol.testsets import official_mean

MARKS = '''
[data.tests.marks]                # a second generic image-image test domain (export.marks_domain, testsets.py)
kind = "image"
format = "split_file"
path = "generic/marks-test.json"
root = "."
'''


def _config(world, extra: str, name: str = "extra.toml"):
    text = (world / "configs" / "toy-naive.toml").read_text()
    assert MARKS in text
    path = world / "configs" / name
    path.write_text(text.replace(MARKS, MARKS + extra))
    return path


def test_the_exported_world_names_a_second_generic_test_domain(world):
    from infusing_kit.protocol.experiment import world_config
    from infusing_kit.protocol.export import marks_domain
    setup = setup_from_config(world / "configs" / "toy-naive.toml", progress=False)
    marks = setup.domains.tests["marks"]
    want = marks_domain(world_config(0, True))
    assert marks.kind == "image" and np.array_equal(marks.split.labels, want.labels)
    assert np.array_equal(marks.split.take(np.arange(len(marks.split))).numpy(), want.images.numpy())
    assert len(np.unique(want.labels)) >= 8 and len(want) == 4 * len(np.unique(want.labels))
    cfg = load_config(world / "configs" / "toy-naive.toml")
    assert cfg["data"]["tests"]["marks"]["kind"] == "image" and cfg["data"]["tests"]["marks"]["path"].endswith(
        "generic/marks-test.json")


def test_the_official_mean_rounds_each_dataset_then_the_mean():
    # knn_utils.compute_knn_metrics rounds each dataset's value to 3 decimals, average_datasets rounds their mean
    assert official_mean([0.0014, 0.0014, 0.0014, 0.0024]) == 0.001  # unrounded mean 0.00165 would give 0.002
    assert official_mean([0.25, 0.5]) == 0.375 and official_mean([0.1234]) == 0.123


@pytest.mark.parametrize("extra, message", [
    ('[data.tests.cars]\nformat = "split_file"\npath = "target/test.json"\n', r"\[data.tests.cars\] kind is missing: "
     r'write kind = "image"'),
    ('[data.tests.cars]\nkind = "video"\nformat = "split_file"\npath = "target/test.json"\n', r"kind is 'video'"),
    ('[data.tests.coco]\nkind = "text"\nformat = "split_file"\npath = "target/test.json"\n',
     r"\[data.tests.coco\]: format 'split_file' does not fit kind = 'text'.*caption_csv"),
    ('[data.tests.cars]\nkind = "image"\nformat = "caption_csv"\npath = "text/test.csv"\n',
     r"format 'caption_csv' does not fit kind = 'image'"),
    ('[data.tests.cars]\nkind = "image"\nformat = "parquet"\npath = "target/test.json"\n',
     r"\[data.tests.cars\]: unknown format 'parquet'"),
    ('[data.tests.cars]\nkind = "image"\nformat = "split_file"\npath = "target/nope.json"\n',
     r"\[data.tests.cars\]: .*nope.json does not exist"),
    ('[data.tests.cars]\nkind = "image"\nformat = "split_file"\npath = "target/test.json"\nsplit = "test"\n',
     r"\[data.tests.cars\]: unknown key\(s\) \['split'\]"),
    ('[data.tests.generic_image]\nkind = "image"\nformat = "split_file"\npath = "target/test.json"\n',
     r"'generic_image' cannot name a test set"),
    ('[data.tests.inshop]\nkind = "image"\nquery = {format = "split_file", path = "target/test.json"}\n',
     r"\[data.tests.inshop\]: missing \['index'\]"),
    ('[data.tests.coco]\nkind = "text"\nquery = {format = "caption_csv", path = "text/test.csv"}\n',
     r"query = / index = are for kind = \"image\" sets"),
    ('[data.tests]\ncars = 3\n', r"\[data.tests.cars\] must be a table"),
])
def test_a_wrong_test_set_is_refused_naming_the_file_and_key(world, extra, message):
    path = _config(world, extra, "broken.toml")
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_a_test_set_with_training_images_is_refused(world):
    path = _config(world, '[data.tests.leak]\nkind = "image"\nformat = "split_file"\npath = "target/train.json"\n'
                          'root = "."\n')
    with pytest.raises(ValueError, match=r"(?s)the test sets leak:.*image\(s\) of \[data.tests.leak\] are also in "
                                         r"\[data.target\] train \(same pixels\).*allow_leakage"):
        setup_from_config(path, progress=False)


def _query_index_domain(world):
    """A third image domain as queries against a gallery (InShop's form): marks of another seed, one query per
    class, written here."""
    from infusing_kit.protocol.experiment import world_config
    from infusing_kit.protocol.export import marks_domain
    split = marks_domain(replace(world_config(0, True), seed=7))
    folder = world / "images-qi"
    folder.mkdir()
    items = []
    for i, (img, c) in enumerate(zip(split.images, split.labels)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
        items.append({"path": f"images-qi/{i:04d}.png", "class_id": int(c)})
    first = {}
    for i, it in enumerate(items):
        first.setdefault(it["class_id"], i)
    (world / "qi-query.json").write_text(json.dumps([it for i, it in enumerate(items) if first[it["class_id"]] == i]))
    (world / "qi-index.json").write_text(json.dumps([it for i, it in enumerate(items) if first[it["class_id"]] != i]))


@pytest.mark.slow
def test_each_test_set_and_the_averages_are_the_numbers_computed_by_hand(world, tmp_path, capsys):
    """The exported world with three extra sets (the exported marks domain, a query/gallery domain and a second
    image-text set) and the merged index: every set's metrics, each average and the merged index's, recomputed here
    from the run's pretrained and fine-tuned models, are metrics.json's; the registry row and `report` carry them;
    and the keys of the same run without [data.tests] are the same to the last bit."""
    from infusing_kit.__main__ import main
    from infusing_kit.metrics import image_text_recall, merged_retrieval_metrics, retrieval_metrics
    from infusing_kit.models import embed_images, embed_texts, load_model
    from infusing_kit.protocol.results import load_results
    _query_index_domain(world)
    rows = list(csv.DictReader(open(world / "text" / "test.csv")))
    images = list(dict.fromkeys(r["image"] for r in rows))[:40]  # a second image-text set: 40 of the probe's images
    subset = [r for r in rows if r["image"] in images]
    with open(world / "text" / "second.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows(subset)
    extra = ('[data.tests.qi]\nkind = "image"\nquery = {format = "split_file", path = "qi-query.json", root = "."}\n'
             'index = {format = "split_file", path = "qi-index.json", root = "."}\n\n'
             '[data.tests.second]\nkind = "text"\nformat = "caption_csv"\npath = "text/second.csv"\nroot = "."\n')
    few = ('schedule = "smoke"', 'schedule = "smoke"\nsteps = 12\neval_every = 6\nckpt_every = 6')
    text = _config(world, extra).read_text().replace(*few).replace("[data]\n", "[data]\nmerged_index = true\n")
    with_sets, without = world / "configs" / "with.toml", world / "configs" / "without.toml"
    with_sets.write_text(text)
    without.write_text(text.replace(MARKS, "").split("[data.tests.qi]")[0] + "[method]" + text.split("[method]")[1])
    assert "[data.tests" not in without.read_text()
    registry = tmp_path / "results.jsonl"
    for cfg, out in ((with_sets, "run"), (without, "plain")):
        assert main(["experiment", "--config", str(cfg), "--out", str(tmp_path / out), "--registry", str(registry)]) == 0
    printed = capsys.readouterr().out  # `experiment` prints the sets and the averages beside the three axes
    assert printed.count('"average_image": {') == 2 and printed.count('"marks": {') == 2
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert "tests" not in plain
    for key in ("best_step", "val", "updates", "warnings", "pretrained", "finetuned"):  # unchanged by the extra sets
        assert m[key] == plain[key], key

    t = m["tests"]
    assert t["sets"] == {"marks": {"kind": "image", "from": "[data.tests.marks]", "size": 64},
                         "qi": {"kind": "image", "from": "[data.tests.qi]", "size": 64},
                         "second": {"kind": "text", "from": "[data.tests.second]", "size": 40}}
    assert t["averages"] == {"average_image": ["in_domain", "generic_image", "marks", "qi"],
                             "average_image_ood": ["generic_image", "marks", "qi"],
                             "average_text": ["image_text", "second"],
                             "average_merged": ["in_domain", "generic_image", "marks", "qi"]}
    setup = setup_from_config(with_sets, progress=False)
    d = setup.domains
    name, start = m["model"], str((world / "configs" / m["config"]["model"]["pretrained"]).resolve())
    for when, model in (("pretrained", load_model(name, start)), ("finetuned", load_model(name, str(tmp_path / "run" /
                                                                                                      "model.pt")))):
        got, base = t[when], m[when]
        emb = lambda s: embed_images(model, s, progress=False)
        parts = {"in_domain": (emb(d.target_test), d.target_test.labels, None, None),
                 "generic_image": (emb(d.generic_test), d.generic_test.labels, None, None),
                 "marks": (emb(d.tests["marks"].split), d.tests["marks"].split.labels, None, None),
                 "qi": (emb(d.tests["qi"].split.query), d.tests["qi"].split.query.labels,
                        emb(d.tests["qi"].split.index), d.tests["qi"].split.index.labels)}
        for n in ("marks", "qi"):
            want = retrieval_metrics(*parts[n])
            assert got[n] == pytest.approx({k: want[k] for k in ("map@20", "mmp@20", "r@1", "skipped")}, abs=1e-9), n
        second = d.tests["second"].split
        captions = [r["caption"] for r in subset]
        want = image_text_recall(emb(second), embed_texts(model, captions, progress=False),
                                 [images.index(r["image"]) for r in subset])
        assert got["second"] == pytest.approx(want, abs=1e-9)
        for n in ("in_domain", "generic_image"):  # the built-in groups the averages take, from the same embeddings
            assert base[n]["map@20"] == pytest.approx(retrieval_metrics(*parts[n])["map@20"], abs=1e-9)
        groups = {**base, **got}
        by_hand = lambda values: float(np.round(sum(np.round(v, 3) for v in values) / len(values), 3))
        for avg, names in t["averages"].items():
            if avg == "average_merged":
                continue
            keys = ("map@20", "mmp@20", "r@1") if avg != "average_text" else [f"{s}_r@{k}" for s in ("i2t", "t2i")
                                                                               for k in (1, 5, 10)]
            assert got[avg] == {k: by_hand([groups[g][k] for g in names]) for k in keys}, (when, avg)
        merged = merged_retrieval_metrics(parts)
        assert got["merged"] == pytest.approx({f"{n}/{k}": merged[n][k] for n in parts
                                               for k in ("map@20", "mmp@20", "r@1")}, abs=1e-9)
        assert got["average_merged"] == {k: by_hand([merged[n][k] for n in parts]) for k in ("map@20", "mmp@20", "r@1")}
        assert 0 < got["average_image"]["map@20"] < 1 and 0 < got["average_text"]["i2t_r@1"] <= 1

    row, plain_row = load_results(registry)
    assert row["tests"] == t and "tests" not in plain_row
    capsys.readouterr()
    assert main(["report", "--registry", str(registry), "--smoke", "--figures", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    assert "Test sets and their averages" in out and "| marks map@20 | qi map@20 | second i2t_r@1 |" in out
    assert "average_image map@20 | average_image_ood map@20 | average_text i2t_r@1 | average_merged map@20 |" in out
