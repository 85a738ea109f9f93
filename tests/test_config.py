"""Real mode, proven offline: the built-in world exported to files (split files, CSVs, caption CSV, a model
checkpoint) and run through a config file reproduces the built-in run; a config's every key is honoured and a
wrong one is refused before any work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infusing_kit.config import load_config, run_config, setup_from_config
from infusing_kit.export import export_world
from infusing_kit.experiment import run_experiment
from conftest import HANG

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "w"
    export_world(out, seed=1, smoke=True, progress=False)
    return out


def _cli(*args, timeout=HANG):
    return subprocess.run([sys.executable, "-m", "infusing_kit", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_an_exported_world_reproduces_the_built_in_run(exported, tmp_path):
    # the paper's combination reads every kind of file: split files, the generic CSV (teacher, L2-SP), captions
    config = exported / "configs" / "toy-paper.toml"
    config.write_text(config.read_text().replace('schedule = "smoke"', 'schedule = "smoke"\nsteps = 60'))
    run_config(config, tmp_path / "cfg", progress=False)
    run_experiment("toy-paper", tmp_path / "builtin", smoke=True, seed=1, progress=False, overrides={"steps": 60})
    got, want = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("cfg", "builtin"))
    diffs = {f"{w}/{ax}/{k}": abs(got[w][ax][k] - want[w][ax][k])
             for w in ("pretrained", "finetuned") for ax in want[w] for k in want[w][ax]}
    assert len(diffs) >= 20 and max(diffs.values()) <= 0.01, diffs
    assert got["train"] == want["train"] and got["config"]["method"]["preset"] == "toy-paper"


def test_every_key_is_honoured_and_echoed(exported, tmp_path):
    text = (exported / "configs" / "toy-naive.toml").read_text()
    text = text.replace('schedule = "smoke"', 'schedule = "smoke"\nl2sp = 123.0\nsteps = 3\nlr_backbone = 0.002')
    (exported / "configs" / "custom.toml").write_text(text)
    setup = setup_from_config(exported / "configs" / "custom.toml")
    assert setup.train.l2sp == 123.0 and setup.train.steps == 3 and setup.train.lr_backbone == 0.002
    assert setup.name == "toy-naive" and setup.source["config"]["method"]["l2sp"] == 123.0
    assert setup.domains.generic_prompts is not None and len(setup.domains.generic_prompts) == 5760


@pytest.mark.parametrize("change, message", [
    (('schedule = "smoke"', 'schedule = "smoke"\nl2_sp = 5.0'), r"unknown key\(s\) \['l2_sp'\]"),
    (('[model]', '[model]\nweights = "x"'), r"\[model\]: unknown key\(s\) \['weights'\]"),
    (('format = "csv"', 'format = "parquet"'), "unknown format 'parquet'"),
    (('path = "generic/train.csv"', 'path = "generic/nope.csv"'), "nope.csv does not exist"),
    (('schedule = "smoke"', 'schedule = "smoke"\nlr_backbone = -1.0'), "lr_backbone must be > 0"),
    (('preset = "toy-naive"', 'preset = "toy-nave"'), "preset 'toy-nave' is unknown"),
    (('[data.text]', '[data.text]\nval = {format = "caption_csv", path = "text/test.csv"}'), r"unknown key\(s\) \['val'\]"),
])
def test_a_wrong_key_path_or_format_is_refused_before_any_work(exported, change, message):
    text = (exported / "configs" / "toy-naive.toml").read_text()
    assert change[0] in text
    path = exported / "configs" / "broken.toml"
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_config(path)


def test_the_cli_names_the_problem_and_exits_2(exported, tmp_path):
    path = exported / "configs" / "typo.toml"
    path.write_text((exported / "configs" / "toy-naive.toml").read_text().replace('schedule = "smoke"',
                                                                                  'schedule = "smoke"\ndistil = 3.0'))
    res = _cli("experiment", "--config", str(path), "--out", str(tmp_path / "x"))
    assert res.returncode == 2 and "distil" in res.stderr and not (tmp_path / "x").exists()
