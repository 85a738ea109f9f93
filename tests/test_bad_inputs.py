"""A drill of bad inputs on a user's own data and weights (docs/refusals.md): each is correct
behaviour or one clear error naming the file, table, key or record, before any training. Every test writes tiny
files (8-pixel images, a 2-block ViT) and runs in a second or two."""
import io
import os
import pickle
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infusing_kit.datasets import records as R
from infusing_kit.datasets.textprobe import text_probe
from infusing_kit.protocol.config import FORMATS, load_config, setup_from_config
from infusing_kit.datasets.data import FileSplit
from infusing_kit.datasets.leakage import shared_images

ROOT = Path(__file__).resolve().parents[1]
_SEED = iter(range(10 ** 6))


def _img(seed: int | None = None, size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(next(_SEED) if seed is None else seed)
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def _png(path: Path, arr: np.ndarray | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_img() if arr is None else arr).save(path, **kw)
    return path


def _classes(root: Path, names, per_class: int = 3) -> Path:
    for n in names:
        for i in range(per_class):
            _png(root / n / f"{i}.png")
    return root


def readme_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", (ROOT / "docs" / "your-data.md").read_text(), re.S)


def readme_minimal() -> str:
    """docs/your-data.md's smallest config ("Your own model and data"), verbatim."""
    block = next(b for b in readme_blocks() if 'name = "my-naive"' in b)
    assert "/data/mine/train" in block and 'format = "image_folder"' in block
    return block


def minimal_world(tmp: Path, target=(("a", "b"), ("c", "d"), ("e", "f")), generic_per_class: int = 8) -> Path:
    """Tiny data at the smallest config's paths (under tmp instead of /data) and that config pointing at it."""
    data = tmp / "data"
    for split, names in zip(("train", "val", "test"), target):
        _classes(data / "mine" / split, names)
    _classes(data / "imagenet" / "train", ("g0", "g1", "g2"), generic_per_class)
    _classes(data / "imagenet" / "val", ("g0", "g1", "g2"), 2)
    for i in range(3):
        _png(data / "flickr" / f"{i}.png")
    (data / "flickr" / "test.csv").write_text("image,caption\n" + "".join(f"{i}.png,caption {i}\n" for i in range(3)))
    path = tmp / "minimal.toml"
    path.write_text(readme_minimal().replace("/data/", f"{data}/"))
    return path


def _edit(path: Path, old: str, new: str, name: str = "edited.toml") -> Path:
    text = path.read_text()
    assert old in text, old
    out = path.with_name(name)
    out.write_text(text.replace(old, new, 1))
    return out


# ---------------------------------------------------------------------------- 1. docs/your-data.md's configs
def test_readme_minimal_config_passes_config_checks_and_data_loading(tmp_path):
    """Image folders number each split's classes from 0: their ids are not shared classes (names are compared)."""
    setup = setup_from_config(minimal_world(tmp_path))
    d = setup.domains
    assert (len(d.target_train), len(d.target_val), len(d.target_test)) == (6, 6, 6)
    assert setup.name == "my-naive" and d.generic_prompts[0] == "a photo of a g0."
    assert len(d.generic_val) == 6 and len(d.generic_train) == 18  # 80/20 of 8 images per class


def test_folders_sharing_a_class_name_are_refused_and_label_space_per_split_keeps_the_image_check(tmp_path):
    path = minimal_world(tmp_path, target=(("a", "b"), ("b", "c"), ("d", "e")))
    with pytest.raises(ValueError, match=r"1 class name\(s\) of \[data.target\] train are also in val, e.g. \['b'\]"
                                         r".*label_space = \"per_split\""):
        setup_from_config(path)
    per_split = _edit(path, "[data.target]", '[data]\nlabel_space = "per_split"\n[data.target]')
    assert len(setup_from_config(per_split).domains.target_val) == 6
    train_img = tmp_path / "data" / "mine" / "train" / "a" / "0.png"
    _png(tmp_path / "data" / "mine" / "val" / "c" / "copy.png", np.asarray(Image.open(train_img)), compress_level=1)
    with pytest.raises(ValueError, match=r"(?s)1 image\(s\) of \[data.target\] val are also in train \(same pixels\).*"
                                         r"copy.png.*allow_leakage"):
        setup_from_config(per_split)


def test_every_toml_block_of_the_readme_passes_the_config_checks(tmp_path):
    """Each config of docs/your-data.md (paths substituted, the files it names created empty) parses and passes `config`
    checks; the study block is checked with the [model] and [data] tables of the first block."""
    from infusing_kit.protocol.study import load_study
    blocks = readme_blocks()
    assert len(blocks) >= 4
    for n, block in enumerate(blocks):
        text = block.replace('root = "/data', f'root = "{tmp_path}/d{n}').replace('"/data/', f'"{tmp_path}/d{n}/')
        if "data" not in tomllib.loads(text):  # "the [model] and [data] tables of ... above, then:"
            first = blocks[0].replace('root = "/data', f'root = "{tmp_path}/d{n}')
            text = first.split("[method]")[0] + text
        cfg = tomllib.loads(text)
        root = Path(cfg["data"].get("root", tmp_path))
        for group, parts in cfg["data"].items():
            if not isinstance(parts, dict):
                continue
            for part in parts.values():
                subs = ([part] if "format" in part else [v for v in part.values() if isinstance(v, dict)]
                        ) if isinstance(part, dict) else []  # ([data.tests.X]: a part, or kind, query and index)
                for spec in subs:
                    folder = spec["format"] in ("image_folder", "generic_folder", "array_record")
                    target = root / spec["path"]
                    (target.mkdir(parents=True, exist_ok=True) if folder else
                     (target.parent.mkdir(parents=True, exist_ok=True), target.touch()))
                    for key in ("root",):
                        if key in spec:
                            (root / spec[key]).mkdir(parents=True, exist_ok=True)
                    for key in ("keys", "embeddings", "gt"):
                        if key in spec:
                            (root / spec[key]).parent.mkdir(parents=True, exist_ok=True)
                            (root / spec[key]).touch()
            if group == "generic" and "prompts" in parts:
                (root / parts["prompts"]).touch()
        path = tmp_path / f"block{n}.toml"
        path.write_text(text)
        if "[study]" in text:
            assert load_study(path).methods
        else:
            assert load_config(path)["model"]["name"]


# ---------------------------------------------------------------------------- 2. leakage on pixels
def test_a_train_image_saved_again_or_at_16_bits_is_found_in_val(tmp_path):
    arr = _img()
    train = _png(tmp_path / "train.png", arr)
    again = _png(tmp_path / "again.png", arr, compress_level=1)
    deep = tmp_path / "deep.png"
    Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(deep)  # 16-bit grey of the red channel
    grey = _png(tmp_path / "grey.png", np.repeat(arr[..., :1], 3, axis=2))
    other = _png(tmp_path / "other.png")
    assert train.read_bytes() != again.read_bytes()
    same = shared_images(FileSplit([str(train), str(grey)], [0, 1], 8),
                         FileSplit([str(again), str(deep), str(other)], [0, 1, 2], 8))
    assert same == [(str(train), str(again)), (str(grey), str(deep))]


# ---------------------------------------------------------------------------- 3. prompt templates
@pytest.mark.parametrize("prompt", ["a photo of a {{}}.", "a {} {x}", "{0} {1}", "a photo"])
def test_a_prompt_template_must_give_each_class_its_own_prompt(tmp_path, prompt):
    path = _edit(minimal_world(tmp_path), 'prompt = "a photo of a {}."', f'prompt = "{prompt}"')
    with pytest.raises(ValueError, match=r"\[data.generic\] prompt = .* must be a string with \{\} where the class"):
        load_config(path)


# ---------------------------------------------------------------------------- 4. precomputed text embeddings
def _text_embeddings(tmp: Path, width: int, bad: float | None = None) -> Path:
    buf = io.BytesIO()
    Image.fromarray(_img()).save(buf, format="PNG")
    R.write_tfrecord(tmp / "q.tfrecord", [R.encode_example({"bytes_image": buf.getvalue(), "id": i}) for i in range(2)])
    emb = {f"c{j}": np.full(width, 0.1 * (j + 1), np.float32) for j in range(4)}
    if bad is not None:
        emb["c2"][1] = bad
    np.save(tmp / "e.npy", emb, allow_pickle=True)
    np.save(tmp / "gt.npy", {0: ["c0", "c1"], 1: ["c2", "c3"]}, allow_pickle=True)
    return tmp


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_text_embeddings_are_refused_naming_file_and_row(tmp_path, bad):
    _text_embeddings(tmp_path, 4, bad)
    with pytest.raises(ValueError, match=r"e.npy: 1 text embedding\(s\) hold NaN or infinity \(first: caption 'c2', "
                                         r"row 2"):
        text_probe([tmp_path / "q.tfrecord"], tmp_path / "e.npy", tmp_path / "gt.npy", 8)


def test_text_embeddings_of_another_width_are_refused_before_any_work(tmp_path):
    path = minimal_world(tmp_path)
    _text_embeddings(tmp_path / "data", 5)
    path = _edit(path, 'test = {format = "caption_csv", path = "' + f'{tmp_path}/data/flickr/test.csv"' + "}",
                 f'test = {{format = "text_embeddings", path = "{tmp_path}/data/q.tfrecord", embeddings = '
                 f'"{tmp_path}/data/e.npy", gt = "{tmp_path}/data/gt.npy"}}')
    with pytest.raises(ValueError, match=r"\[data.text.test\] .*e.npy: the text embeddings are 5 wide but ViT-B-32's "
                                         r"image embeddings are 512"):
        setup_from_config(path)


# ---------------------------------------------------------------------------- 5. merged index
def test_merged_index_with_one_test_split_for_both_domains_is_refused(tmp_path):
    path = minimal_world(tmp_path)
    text = path.read_text()
    target_test = re.search(r"test  = (\{.*mine/test\"\})", text).group(1)
    same = _edit(path, "[data.target]", "[data]\nmerged_index = true\n[data.target]")
    same.write_text(same.read_text().replace(re.search(r"test  = (\{.*imagenet/val\"\})", text).group(1), target_test))
    with pytest.raises(ValueError, match=r"merged_index = true, but \[data.generic\] test is \[data.target\] test"):
        load_config(same)
    import shutil  # a copy of the target test in another folder: the same images, found by content
    shutil.copytree(tmp_path / "data" / "mine" / "test", tmp_path / "data" / "copy")
    copy = _edit(path, "[data.target]", "[data]\nmerged_index = true\nlabel_space = \"per_split\"\n[data.target]", "c.toml")
    copy.write_text(copy.read_text().replace("imagenet/val", "copy"))
    with pytest.raises(ValueError, match=r"6 image\(s\) of \[data.generic\] test are also in \[data.target\] test"):
        setup_from_config(copy)


# ---------------------------------------------------------------------------- 7. weight files
def _tiny_vit(depth: int = 2, seed: int = 0):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=depth, num_heads=2, num_classes=0,
                             class_token=False, global_pool="map")


def _npz(tmp: Path, depth: int = 2, name: str = "w.npz", change=None) -> Path:
    from types import SimpleNamespace

    from test_models import _big_vision_npz
    path = tmp / name
    _big_vision_npz(SimpleNamespace(trunk=_tiny_vit(depth, seed=1)), path, heads=2)
    if change is not None:
        arrays = dict(np.load(path))
        change(arrays)
        np.savez(path, **arrays)
    return path


def test_a_big_vision_npz_that_does_not_fit_is_refused_naming_file_and_key(tmp_path):
    """The kit called timm's converter directly, which loads a deeper model's file or NaN weights with no word (shown
    first); `weightfiles.load_big_vision`, what `load_model(name, "x.npz")` uses, checks around it."""
    from timm.models.vision_transformer import _load_weights

    from infusing_kit.weightfiles import load_big_vision
    good, model = _npz(tmp_path), _tiny_vit()
    _load_weights(_tiny_vit(), str(_npz(tmp_path, depth=3, name="deeper.npz")))  # timm alone: no word
    load_big_vision(model, good, "tiny")
    assert torch.equal(model.blocks[1].mlp.fc2.weight, _tiny_vit(seed=1).blocks[1].mlp.fc2.weight)
    deeper = tmp_path / "deeper.npz"
    with pytest.raises(ValueError, match=r"deeper.npz: \d+ key\(s\) of its image tower have no place in 'tiny', e.g. "
                                         r"\['params/img/Transformer/encoderblock_2/"):
        load_big_vision(_tiny_vit(), deeper, "tiny")
    key = "params/img/Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel"
    nan = _npz(tmp_path, name="nan.npz", change=lambda a: a[key].__setitem__((0, 0), np.nan))
    with pytest.raises(ValueError, match=f"nan.npz: {key} holds 1 NaN or infinite"):
        load_big_vision(_tiny_vit(), nan, "tiny")
    wide = _npz(tmp_path, name="wide.npz", change=lambda a: a.__setitem__(key, np.zeros((64, 64), np.float32)))
    with pytest.raises(ValueError, match=f"wide.npz: {key} has shape \\(64, 64\\), which does not fit 'tiny'"):
        load_big_vision(_tiny_vit(), wide, "tiny")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut.npz is not a readable .npz archive .*truncated"):
        load_big_vision(_tiny_vit(), cut, "tiny")


def test_another_models_state_dict_or_a_pickle_as_pretrained_is_one_clear_error(tmp_path):
    from infusing_kit.models import load_model
    torch.manual_seed(0)
    torch.save(load_model("toy-clip", None).model.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt is not a checkpoint of 'toy-clip-tiny'"):
        load_model("toy-clip-tiny", str(tmp_path / "other.pt"))
    import collections
    with open(tmp_path / "junk.pt", "wb") as f:
        pickle.dump({"state_dict": collections.Counter("abc")}, f)
    with pytest.raises(ValueError, match=r"junk.pt is not a checkpoint of 'toy-clip-tiny' \(it holds objects other"):
        load_model("toy-clip-tiny", str(tmp_path / "junk.pt"))


# ---------------------------------------------------------------------------- 8. records
def test_record_images_are_decoded_before_training_naming_file_and_record(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_img(size=16)).save(buf, format="PNG")
    png = buf.getvalue()
    recs = [{"image_bytes": png, "class_id": 0, "key": "k0"}, {"image_bytes": png[: len(png) // 2], "class_id": 1,
                                                                 "key": "k1"}]
    R.write_tfrecord(tmp_path / "t.tfrecord", [R.encode_example(r) for r in recs])
    read = FORMATS["tfrecord"].read
    R.write_tfrecord(tmp_path / "ok.tfrecord", [R.encode_example(recs[0])])
    from infusing_kit.datasets.leakage import content_hashes, pixel_hash
    assert content_hashes(read({"path": str(tmp_path / "ok.tfrecord")}, 8)) == [pixel_hash(png)]  # decoded once
    with pytest.raises(ValueError, match=r"t.tfrecord: record 1 \(key 'k1'\) has no readable image"):
        read({"path": str(tmp_path / "t.tfrecord")}, 8)
    R.write_tfrecord(tmp_path / "n.tfrecord", [R.encode_example({"class_id": 0, "key": "k0", "jpeg": png})])
    with pytest.raises(ValueError, match=r"n.tfrecord: record 0 \(key 'k0'\) has no readable image: .*no "
                                         r"'image_bytes' feature"):
        read({"path": str(tmp_path / "n.tfrecord")}, 8)
    R.write_array_record(tmp_path / "a.array_record", [R.encode_example(recs[0])] * 20)
    raw = (tmp_path / "a.array_record").read_bytes()
    (tmp_path / "a.array_record").write_bytes(raw[: len(raw) - 10])
    with pytest.raises(ValueError, match=r"a.array_record: not a readable ArrayRecord shard .*truncated"):
        FORMATS["array_record"].read({"path": str(tmp_path / "a.array_record")}, 8)


# ---------------------------------------------------------------------------- 9. retrieval splits without positives
def test_one_validation_image_per_class_is_refused_before_any_work_naming_the_split(tmp_path):
    path = minimal_world(tmp_path, generic_per_class=5)  # round(0.2 * 5) = 1 validation image per class
    with pytest.raises(ValueError, match=r"\[data.generic.val\]: every class has a single image \(3 images, 3 classes\)"
                                         r".*val_fraction = 0.2 .*at least 8 images each"):
        setup_from_config(path)


# ---------------------------------------------------------------------------- 10. resume files
def test_a_crafted_last_pt_is_refused_and_its_payload_never_runs(tmp_path):
    from infusing_kit.checkpoints import RunFolder
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"visual": {}, "identity": Payload()}, run / "last.pt")
    folder = RunFolder(run, resume=True)
    with pytest.raises(ValueError, match=r"last.pt is not a checkpoint this kit can load safely .*it was not used"):
        folder.restore({"model": "x"})
    folder.close()
    assert not marker.exists()
    torch.save({"visual": {"w": torch.zeros(2)}, "head": {}, "identity": {"model": "x"}}, run / "last.pt")
    assert RunFolder(run, resume=True).restore({"model": "x"})["visual"]["w"].shape == (2,)
