"""Datasets from disk, in every format the kit reads, on small files the tests generate: what a user's folders
look like (hidden folders, EXIF-rotated JPEGs, grayscale / palette / RGBA / CMYK files, several broken files),
and the proof that streaming from files trains exactly like the same images held in memory."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infusing_kit.datasets import data as D
from infusing_kit.models import load_model
from infusing_kit.train import TrainConfig, train


def _save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def _folder(root: Path, classes=("b_cls", "a_cls"), per_class=3, size=(20, 28), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            _save(root / c / f"{i}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return root


def test_image_folder_ignores_hidden_folders_and_files(tmp_path):
    root = _folder(tmp_path / "ds")
    _save(root / ".ipynb_checkpoints" / "0-checkpoint.png", np.zeros((8, 8, 3), np.uint8))
    _save(root / "a_cls" / ".hidden.png", np.zeros((8, 8, 3), np.uint8))
    s = D.image_folder(root, 16)
    assert s.class_names == ["a_cls", "b_cls"] and len(s) == 6 and list(s.labels) == [0, 0, 0, 1, 1, 1]
    assert s.take([0, 5]).shape == (2, 3, 16, 16) and s.take([0]).dtype == torch.uint8


def test_every_unreadable_file_is_reported_at_once_or_skipped_and_counted(tmp_path):
    root = _folder(tmp_path / "ds")
    (root / "a_cls" / "broken1.jpg").write_bytes(b"not an image")
    (root / "b_cls" / "broken2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="2 unreadable") as e:
        D.image_folder(root, 16)
    assert "broken1.jpg" in str(e.value) and "broken2.png" in str(e.value) and "skip_unreadable" in str(e.value)
    s = D.image_folder(root, 16, skip_unreadable=True)
    assert len(s) == 6 and len(s.skipped) == 2
    with pytest.raises(ValueError, match="2 unreadable"):
        D.load_image_folder(root, 16)
    m = D.load_image_folder(root, 16, skip_unreadable=True)
    assert len(m) == 6 and len(m.skipped) == 2


def test_exif_orientation_is_applied(tmp_path):
    # a horizontal gradient stored sideways with EXIF "rotate 90 CW to display" must decode as the upright image
    arr = np.zeros((12, 36, 3), np.uint8)
    arr[..., 0] = np.arange(36)[None] * 7
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "exif.jpg", exif=exif, quality=100)
    Image.fromarray(np.ascontiguousarray(np.rot90(arr, k=-1))).save(tmp_path / "upright.jpg", quality=100)
    Image.fromarray(arr).save(tmp_path / "ignored.jpg", quality=100)
    got, want, wrong = (D.read_image(tmp_path / f, 12).float() for f in ("exif.jpg", "upright.jpg", "ignored.jpg"))
    assert (got - want).abs().mean() < 3 < (got - wrong).abs().mean()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK"])
def test_any_colour_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8))
    im = rgb.convert(mode)
    path = tmp_path / f"x.{'jpg' if mode == 'CMYK' else 'png'}"
    im.save(path)
    x = D.read_image(path, 12)
    assert x.shape == (3, 12, 12) and x.dtype == torch.uint8


def test_split_file_csv_generic_folder_and_caption_formats(tmp_path):
    root = _folder(tmp_path / "imgs", classes=("c0", "c1", "c2", "c3"), per_class=5)
    files = sorted(str(p.relative_to(tmp_path)) for p in root.rglob("*.png"))
    (tmp_path / "train.json").write_text(json.dumps([{"path": f, "class_id": i % 3} for i, f in enumerate(files)]))
    s = D.split_file(tmp_path / "train.json", 8)
    assert len(s) == 20 and list(s.labels[:4]) == [0, 1, 2, 0]
    (tmp_path / "t.csv").write_text("path,label\n" + "".join(f"{f},{f.split('/')[1]}\n" for f in files))
    c = D.csv_split(tmp_path / "t.csv", 8)
    assert c.class_names == ["c0", "c1", "c2", "c3"] and len(c) == 20
    tr, va = D.generic_folder(root, 8, seed=3)
    tr2, va2 = D.generic_folder(root, 8, seed=3)
    assert va.paths == va2.paths and not set(tr.paths) & set(va.paths) and len(va) == 4  # 20% of each class
    assert sorted(set(va.labels)) == [0, 1, 2, 3]
    assert D.generic_folder(root, 8, seed=4)[1].paths != va.paths
    (tmp_path / "caps.csv").write_text("image,caption\n" + f"{files[0]},a cat\n{files[0]},the cat\n{files[1]},a dog\n")
    t = D.caption_csv(tmp_path / "caps.csv", 8)
    assert len(t) == 2 and t.captions == ["a cat", "the cat", "a dog"] and list(t.caption_image) == [0, 0, 1]
    kar = {"images": [{"filename": Path(f).name, "filepath": str(Path(f).parent), "split": sp,
                       "sentences": [{"raw": f"caption {i} {j}"} for j in range(5)]}
                      for i, (f, sp) in enumerate(zip(files[:4], ["test", "train", "test", "val"]))]}
    (tmp_path / "dataset.json").write_text(json.dumps(kar))
    k = D.karpathy_json(tmp_path / "dataset.json", 8, tmp_path)
    assert len(k) == 2 and len(k.captions) == 10 and list(k.caption_image) == [0] * 5 + [1] * 5
    with pytest.raises(FileNotFoundError, match="do not exist"):
        (tmp_path / "bad.json").write_text(json.dumps([{"path": "nope.png", "class_id": 0}]))
        D.split_file(tmp_path / "bad.json", 8)
    with pytest.raises(ValueError, match="columns path,label"):
        (tmp_path / "bad.csv").write_text("file,class\nx,1\n")
        D.csv_split(tmp_path / "bad.csv", 8)


def test_training_from_files_equals_training_from_memory(tmp_path):
    # the same PNG images, streamed by DataLoader workers vs held in memory: identical weights
    root = _folder(tmp_path / "ds", classes=("a", "b", "c"), per_class=6, size=(32, 32))
    files = D.image_folder(root, 32)
    memory = D.Split(files.take(np.arange(len(files))), files.labels)
    cfg = TrainConfig(steps=4, batch_size=6, eval_every=0, ckpt_every=0, lr_backbone=1e-3)
    weights = []
    for split in (files, memory):
        torch.manual_seed(0)
        vlm = load_model("toy-clip-tiny", None)
        train(vlm, split, cfg, progress=False)
        weights.append(vlm.visual.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_fingerprints_change_with_the_data(tmp_path):
    root = _folder(tmp_path / "ds")
    a = D.image_folder(root, 16).fingerprint()
    assert a == D.image_folder(root, 16).fingerprint() and a != D.image_folder(root, 24).fingerprint()
    _save(root / "a_cls" / "9.png", np.zeros((8, 8, 3), np.uint8))
    assert D.image_folder(root, 16).fingerprint() != a
