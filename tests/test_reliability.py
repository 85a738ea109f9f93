"""Reliability on a user's own data (docs/refusals.md): one test per row. The same config gives the
same model; leakage between splits is refused; values of the wrong type are refused naming file, table and key;
one process per run folder; deep and truncated images; a full disk; bad paths and names refused before any work;
run folders that hold what a search needs and no more."""
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infusing_kit.datasets import data as D
from infusing_kit.protocol.config import load_config, run_config, setup_from_config
from conftest import HANG

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}




def _config(world: Path, change: tuple[str, str] | None = None, name: str = "c.toml", base: str = "toy-naive") -> Path:
    text = (world / "configs" / f"{base}.toml").read_text()
    if change is not None:
        assert change[0] in text, change[0]
        text = text.replace(change[0], change[1], 1)
    path = world / "configs" / name
    path.write_text(text)
    return path


def _short(world, name="short.toml", extra="steps = 6\neval_every = 3", change=None):
    return _config(world, change or ('schedule = "smoke"', f'schedule = "smoke"\n{extra}'), name)


# ---------------------------------------------------------------------------- same config, same model
RANDOM_INIT = ('name = "toy-clip"\npretrained = "../model/toy-clip-seed0.pt"', 'name = "toy-clip-tiny"')


def test_a_random_init_config_gives_the_same_model_twice_and_resumes(world, tmp_path):
    path = _short(world, "rand.toml")
    path.write_text(path.read_text().replace(*RANDOM_INIT))
    a = setup_from_config(path).model()
    b = setup_from_config(path).model()
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    m1 = run_config(path, tmp_path / "one", progress=False)
    m2 = run_config(path, tmp_path / "two", progress=False)
    for k in ("pretrained", "finetuned", "val", "weights", "best_step"):
        assert m1[k] == m2[k], k
    # an interrupted run of the same config resumes (its starting weights are the same again)
    interrupted = tmp_path / "three"
    from infusing_kit.protocol.config import setup_from_config as s2
    from infusing_kit.protocol.experiment import run_setup
    with pytest.raises(KeyboardInterrupt):
        def stop(state):
            if state.target_step == 3:
                raise KeyboardInterrupt
        run_setup(s2(path), interrupted, progress=False, hooks=(stop,))
    m3 = run_config(path, interrupted, progress=False, resume=True)
    assert m3["finetuned"] == m1["finetuned"]
    # the model.pt of a random-init run holds its text tower: loading it twice gives the same model
    from infusing_kit.models import load_model
    x, y = (load_model("toy-clip-tiny", str(tmp_path / "one" / "model.pt")) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(x.model.state_dict().values(), y.model.state_dict().values()))


# ---------------------------------------------------------------------------- leakage
def test_the_same_images_in_two_splits_are_refused_and_the_switch_allows_them(world):
    (world / "target" / "test.json").write_text((world / "target" / "train.json").read_text())
    path = _config(world)
    with pytest.raises(ValueError, match=r"(?s)\[data.target\] test are also in train .*allow_leakage") as e:
        setup_from_config(path)
    assert "class id(s)" in str(e.value) and "images/fine_train/00000.png" in str(e.value)
    allowed = _config(world, ("size = 32", "size = 32\nallow_leakage = true"), "allowed.toml")
    assert len(setup_from_config(allowed).domains.target_test) == len(setup_from_config(allowed).domains.target_train)


def test_shared_classes_and_a_generic_test_equal_to_generic_train_are_refused(world):
    test = json.loads((world / "target" / "test.json").read_text())
    train = json.loads((world / "target" / "train.json").read_text())
    for it in test[:5]:
        it["class_id"] = train[0]["class_id"]
    (world / "target" / "test.json").write_text(json.dumps(test))
    with pytest.raises(ValueError, match=r"1 class id\(s\) of \[data.target\] train are also in test"):
        setup_from_config(_config(world))
    (world / "target" / "test.json").write_text(json.dumps([dict(it, class_id=it["class_id"]) for it in test[5:]]))
    rows = (world / "generic" / "train.csv").read_text().splitlines()[1:]
    (world / "generic" / "test.json").write_text(json.dumps([{"path": r.split(",")[0], "class_id": int(r.split(",")[1])}
                                                             for r in rows]))
    with pytest.raises(ValueError, match=r"\[data.generic\] test are also in train"):
        setup_from_config(_config(world, name="g.toml"))


# ---------------------------------------------------------------------------- strict values
@pytest.mark.parametrize("change, message", [
    (('schedule = "smoke"', 'schedule = "smoke"\nwise_ft = "no"'), r"\[method\] wise_ft = 'no' \(a TOML string\) must be true or false"),
    (('format = "csv", path = "generic/train.csv"', 'format = "csv", path = "generic/train.csv", skip_unreadable = "no"'),
     r"\[data.generic.train\] skip_unreadable = 'no' .* must be true or false; write true or false without quotes"),
    (("size = 32", "size = 0"), r"\[data\] size = 0 .* must be an integer >= 1"),
    (('[model]\nname = "toy-clip"', '[model]\nname = 3'), r"\[model\] name = 3 \(int\) must be a non-empty string"),
    (("seed = 0", 'seed = "zero"'), r"seed = 'zero' .* must be an integer >= 0; write the number without quotes"),
    (('path = "target/train.json"', "path = 5"), r"\[data.target.train\] path = 5 .* must be a non-empty string"),
    (('prompts = "generic/prompts.txt"', 'prompt = "a photo"'), r"prompt = 'a photo' .* with \{\} where the class name"),
    (('schedule = "smoke"', 'schedule = "smoke"\nsteps = "10"'), r"\[method\]: TrainConfig.steps must be a finite int"),
])
def test_values_of_the_wrong_type_name_file_table_key_and_what_is_expected(world, change, message):
    with pytest.raises(ValueError, match=message):
        load_config(_config(world, change))


def test_bad_prompt_caption_and_label_files_are_refused_naming_the_file(world):
    prompts = world / "generic" / "prompts.txt"
    prompts.write_text("\n".join(prompts.read_text().splitlines()[:10]) + "\n")
    with pytest.raises(ValueError, match=r"prompts\.txt has 10 lines .* for \d+ generic classes"):
        setup_from_config(_config(world))
    (world / "generic" / "prompts.txt").write_text("\n".join(f"p{i}" for i in range(5760)) + "\n")
    csv_ = world / "text" / "test.csv"
    lines = csv_.read_text().splitlines()
    csv_.write_text("\n".join(lines[:3] + [lines[3].rsplit(",", 1)[0] + ","] + lines[4:]) + "\n")
    with pytest.raises(ValueError, match="empty caption"):
        setup_from_config(_config(world, name="t.toml"))
    csv_.write_bytes("\n".join(lines).encode() + "\nimages/text_test/00000.png,caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"test\.csv is not UTF-8 text"):
        setup_from_config(_config(world, name="u.toml"))
    csv_.write_text("\n".join(lines) + "\n")
    split = json.loads((world / "target" / "val.json").read_text())
    split[2]["class_id"] = "seven"
    (world / "target" / "val.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"val\.json: entry 2 .* integer class_id"):
        setup_from_config(_config(world, name="v.toml"))


# ---------------------------------------------------------------------------- one run per folder
@pytest.mark.slow
def test_two_processes_on_one_out_folder_the_second_is_refused_at_once(world, tmp_path):
    path = _short(world, extra="steps = 40\neval_every = 20")
    cmd = [sys.executable, "-m", "infusing_kit", "experiment", "--config", str(path), "--out", str(tmp_path / "r")]
    first = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "r" / ".lock").exists() and first.poll() is None:
        time.sleep(0.2)
    time.sleep(1)
    t0 = time.time()
    second = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr, second.stderr[-1500:]
    assert time.time() - t0 < 60
    first.communicate(timeout=900)
    assert first.returncode == 0 and json.loads((tmp_path / "r" / "metrics.json").read_text())["best_step"] == 40


# ---------------------------------------------------------------------------- images
def test_16_bit_images_are_read_at_their_real_range_and_mix_with_8_bit(tmp_path):
    grey = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    Image.fromarray((grey // 257).astype(np.uint8)).convert("RGB").save(tmp_path / "plain.png")
    deep, plain = (D.read_image(tmp_path / f, 8) for f in ("deep.png", "plain.png"))
    assert deep.dtype == torch.uint8 and int(deep.max()) > 200
    assert (deep.int() - plain.int()).abs().max() <= 1
    root = tmp_path / "ds"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        shutil.copy(tmp_path / "deep.png", root / c / "0.png")
        shutil.copy(tmp_path / "plain.png", root / c / "1.png")
    s = D.image_folder(root, 8)
    batch = s.take([0, 1, 2, 3])
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 8, 8)


def test_a_truncated_jpeg_is_found_before_training_and_skipped_when_asked(tmp_path):
    root = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(3):
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg", quality=90)
    whole = (root / "a" / "0.jpg").read_bytes()
    (root / "a" / "0.jpg").write_bytes(whole[: len(whole) // 2])  # the header is intact
    with pytest.raises(ValueError, match=r"(?s)1 unreadable .*0\.jpg"):
        D.image_folder(root, 16)
    s = D.image_folder(root, 16, skip_unreadable=True)
    assert len(s) == 5 and s.skipped == [str(root / "a" / "0.jpg")]
    assert s.take(list(range(5))).shape == (5, 3, 16, 16)


# ---------------------------------------------------------------------------- disk full, bad paths and names
def test_a_full_disk_says_so_and_leaves_no_partial_file(tmp_path, monkeypatch):
    from infusing_kit import checkpoints
    def full(obj, f):
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")
    monkeypatch.setattr(checkpoints.torch, "save", full)
    with pytest.raises(OSError, match="the disk is full; the partial file was removed and nothing was replaced"):
        checkpoints.atomic_save({"x": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(checkpoints.Path, "write_text",
                        lambda self, t: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match="the disk is full"):
        checkpoints.atomic_write_text("{}", tmp_path / "metrics.json")
    assert list(tmp_path.iterdir()) == []


def test_bad_registry_select_and_single_class_are_refused_before_any_model_work(world, tmp_path):
    from infusing_kit.protocol.config import setup_from_config as setup
    from infusing_kit.protocol.experiment import run_setup
    path = _short(world)
    calls = []
    s = setup(path)
    s.model = lambda: calls.append("model") or (_ for _ in ()).throw(AssertionError("the model was loaded"))
    (tmp_path / "reg").mkdir()
    with pytest.raises(IsADirectoryError, match="--registry .* is a folder"):
        run_setup(s, tmp_path / "a", registry=tmp_path / "reg", progress=False)
    typo = setup(_short(world, "typo.toml", extra="steps = 6\nselect = \"mean_map@10\""))
    typo.model = s.model
    with pytest.raises(ValueError, match=r"select = 'mean_map@10' is not a validation score"):
        run_setup(typo, tmp_path / "b", progress=False)
    one = setup(path)
    one.domains.target_train.labels[:] = one.domains.target_train.labels[0]
    one.model = s.model
    with pytest.raises(ValueError, match="has 1 class"):
        run_setup(one, tmp_path / "c", progress=False)
    assert calls == []


@pytest.mark.parametrize("args, message", [
    (["experiment", "--preset", "toy-naive", "--smoke", "--out", "OUT", "--device", "cuda"], "no CUDA device"),
    (["compare", "--out", "OUT", "--presets", "toy-l2sq"], "--preset 'toy-l2sq' is unknown"),
    (["search", "--preset", "toy-naiv", "--storage", "OUT/s.db"], "--preset 'toy-naiv' is unknown"),
])
def test_cli_mistakes_are_one_line_errors(tmp_path, args, message):
    res = subprocess.run([sys.executable, "-m", "infusing_kit", *[a.replace("OUT", str(tmp_path)) for a in args]],
                         env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr[-1500:]


def test_config_users_get_hints_in_config_terms(world, monkeypatch, capsys):
    split = json.loads((world / "target" / "train.json").read_text())
    (world / "broken.png").write_bytes(b"not a png")
    split[0]["path"] = "broken.png"
    (world / "target" / "train.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"(?s)\[data.target.train\]: 1 unreadable .*broken\.png.*set skip_unreadable = "
                                         r"true in \[data.target\] train") as e:
        setup_from_config(_config(world))
    assert "skip_unreadable=True" not in str(e.value) and ".skipped" not in str(e.value)
    with pytest.raises(ValueError, match=r"pretrained = 'toy': the toy VLM is a checkpoint file in a config"):
        load_config(_config(world, ('pretrained = "../model/toy-clip-seed0.pt"', 'pretrained = "toy"'), name="t.toml"))
    # Ctrl-C during a run: one line that says how to continue, no traceback
    from infusing_kit import __main__ as cli
    from infusing_kit.protocol import experiment

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(experiment, "run_experiment", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.main(["experiment", "--preset", "toy-naive", "--smoke", "--out", str(world / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "interrupted: the run in" in err and "--resume" in err and "Traceback" not in err


def test_a_pretrained_tag_offline_is_one_clear_error(world):
    path = _config(world, ('pretrained = "../model/toy-clip-seed0.pt"', 'pretrained = "laion2b_s34b_b79k"'))
    path.write_text(path.read_text().replace('name = "toy-clip"', 'name = "ViT-B-32"'))
    res = subprocess.run([sys.executable, "-m", "infusing_kit", "experiment", "--config", str(path), "--out",
                          str(world / "o")], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert res.returncode == 2 and "cannot be downloaded" in res.stderr and "Traceback" not in res.stderr, \
        res.stderr[-2000:]


def test_non_finite_teacher_rows_are_named():
    from infusing_kit.models import load_model
    from infusing_kit.methods.teacher import TeacherEmbeddings
    torch.manual_seed(0)
    vlm = load_model("toy-clip-tiny", None)
    t = TeacherEmbeddings(torch.ones(4, vlm.embed_dim), "x")
    t.embeddings[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"1 generic image\(s\) are not finite \(rows \[2\]\)"):
        t.check(vlm, D.Split(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), np.arange(4)))


# ---------------------------------------------------------------------------- run folders sized for searches
def test_a_finished_run_keeps_model_metrics_and_log_and_a_trial_keeps_no_weights(world, tmp_path):
    path = _short(world)
    run_config(path, tmp_path / "r", progress=False)
    kept = sorted(str(p.relative_to(tmp_path / "r")) for p in (tmp_path / "r").rglob("*") if p.is_file())
    assert kept == [".lock", "metrics.json", "model.pt", "run/.lock", "run/log.jsonl"], kept
    from infusing_kit.protocol.experiment import run_setup
    from infusing_kit.protocol.config import setup_from_config as setup
    run_setup(setup(path), tmp_path / "trial", progress=False, test=False, keep_weights=False)
    assert not (tmp_path / "trial" / "model.pt").exists() and (tmp_path / "trial" / "metrics.json").exists()
