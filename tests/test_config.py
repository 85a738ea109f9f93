"""Real mode, proven offline: the built-in world exported to files (split files, CSVs, caption CSV, a model
checkpoint) holds the built-in world bit for bit, and run through a config file it is the built-in run to the last
digit; a config's every key is honoured and a wrong one is refused before any work."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from infusing_kit.protocol.config import load_config, setup_from_config
from infusing_kit.protocol.export import export_world
from infusing_kit.protocol.experiment import toy_setup
from infusing_kit.identity import IDENTITY
from infusing_kit.protocol.presets import PRESETS
from infusing_kit.pretrain import fingerprint
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


def test_the_exported_files_hold_the_built_in_world_bit_for_bit(exported):
    # what the exported run starts from is the built-in run's: every file decodes to the built-in world's pixels, in
    # its order, with its labels; the prompts, the captions, the starting weights and the TrainConfig are the same
    setup = setup_from_config(exported / "configs" / "toy-paper.toml", progress=False)
    builtin = toy_setup("toy-paper", seed=1, smoke=True, progress=False)
    assert (setup.train, setup.post_hoc, setup.seed, setup.smoke) == (builtin.train, builtin.post_hoc, builtin.seed,
                                                                     builtin.smoke)
    for f in ("target_train", "target_val", "target_test", "generic_train", "generic_val", "generic_test", "text_test"):
        got, want = getattr(setup.domains, f), getattr(builtin.domains, f)
        pixels = got.take(np.arange(len(got)))
        assert pixels.dtype == torch.uint8 and pixels.is_contiguous() and torch.equal(pixels, want.images), f
        if f != "text_test":  # the caption CSV numbers its images 0..N-1 (image-text recall reads caption_image only)
            assert np.array_equal(got.labels, want.labels), f
    text, want_text = setup.domains.text_test, builtin.domains.text_test
    assert text.captions == want_text.captions and np.array_equal(text.caption_image, want_text.caption_image)
    assert setup.domains.generic_prompts == builtin.domains.generic_prompts
    assert setup.domains.merged_index == builtin.domains.merged_index
    a, b = setup.model(), builtin.model()
    assert fingerprint(a) == fingerprint(b) and (a.image_size, a.mean, a.std) == (b.image_size, b.mean, b.std)


DRILL_SEED = 5  # the seed of the drill that found the difference (any seed must do)
SAME = ("best_step", "val", "updates", "stopped_at", "warnings", "post_hoc", "post_hoc_curve", "pretrained",
        "finetuned")


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "run" / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_an_exported_world_reproduces_the_built_in_run(tmp_path):
    """The drill, as a user runs it: `export-world --smoke`, then `experiment --preset toy-paper --smoke` and
    `experiment --config <exported>/configs/toy-paper.toml`, each in a process of its own, at the smoke schedule's
    full length. The paper's combination reads every kind of file: split files, the generic CSV (its generic batches
    and the teacher embeddings of distillation), the caption CSV and the model checkpoint.

    Equal means equal, with no tolerance: the same float operations in the same order on the same inputs with the
    same thread count give the same bits, and both runs record the same starting weights, threads and torch
    (metrics.json, `identity.IDENTITY`, asserted). A difference in the last bit of one step is a different run: over
    the smoke schedule such a difference grew to another kept checkpoint and test metrics 0.027 apart (the drill;
    the former check, 60 steps and 0.01 per metric, let it pass)."""
    world = tmp_path / "w"
    res = _cli("export-world", "--out", str(world), "--seed", str(DRILL_SEED), "--smoke")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = {"built-in": ("--preset", "toy-paper", "--smoke", "--seed", str(DRILL_SEED)),
            "file": ("--config", str(world / "configs" / "toy-paper.toml"))}
    for name, args in runs.items():
        res = _cli("experiment", *args, "--out", str(tmp_path / name))
        assert res.returncode == 0, (name, res.stderr[-3000:])
    want, got = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in runs)
    smoke = PRESETS["toy-paper"].smoke_train
    assert got["train"] == want["train"] and want["train"]["steps"] == smoke.steps  # the full smoke schedule
    assert got["config"]["method"] == {"preset": "toy-paper", "schedule": "smoke"} and want["smoke"] is True
    assert {k: got[k] for k in IDENTITY} == {k: want[k] for k in IDENTITY}  # weights, threads, torch, device
    a, b = _log(tmp_path / "built-in"), _log(tmp_path / "file")
    validations = [r["target_step"] for r in a if "val/mean_map@20" in r]
    assert validations == list(range(0, smoke.steps + 1, smoke.eval_every)), validations
    if a == b and all(got[k] == want[k] for k in SAME):
        return
    # not the same run: where it parted, and whether the built-in run is itself the same in another process
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    again = _cli("experiment", *runs["built-in"], "--out", str(tmp_path / "built-in-again"))
    itself = _log(tmp_path / "built-in-again") == a if again.returncode == 0 else f"rerun failed: {again.stderr[-500:]}"
    line = lambda log: log[first] if first < len(log) else None
    pytest.fail(f"the exported run is not the built-in run: first differing log line {first} of {len(a)}/{len(b)}:"
                f"\n  built-in {line(a)}\n  file     {line(b)}\ndiffering results: "
                f"{[k for k in SAME if got[k] != want[k]]} (kept step {want['best_step']} vs {got['best_step']}); "
                f"the built-in run again, in a new process, gives its own log again: {itself}")


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


@pytest.mark.parametrize("post_hoc", ["wise_ft", "lines", "model_stock", "soup_uniform", "soup_greedy"])
def test_an_experiment_config_runs_every_post_hoc_method_training_the_runs_a_merge_takes(world, tmp_path, post_hoc):
    """`experiment --config` with each post-hoc method: the one setup factory carries what a merge of several runs
    takes (Model Stock: another fine-tuning seed; soups: half and twice the backbone rate), so the runs it merges
    are trained first, into OUT/ingredients/N, as `experiment --preset` does; the merge is then chosen on
    validation. (These were refused before: the built-in path alone knew a merge's ingredients.)"""
    from infusing_kit.__main__ import main
    from infusing_kit.methods.posthoc import ingredients_of
    text = (world / "configs" / "toy-naive.toml").read_text()
    old = 'schedule = "smoke"'
    assert old in text
    cfg = world / "configs" / f"{post_hoc}.toml"
    cfg.write_text(text.replace(old, f'{old}\nsteps = 12\neval_every = 6\npost_hoc = "{post_hoc}"'))
    out = tmp_path / "run"
    assert main(["experiment", "--config", str(cfg), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    parts = [json.loads(p.read_text()) for p in sorted((out / "ingredients").glob("*/metrics.json"))]
    want = {None: [], "seeds": [{"seed": m["train"]["seed"] + 1000}],
            "lrs": [{"lr_backbone": m["train"]["lr_backbone"] * f} for f in (0.5, 2.0)]}[ingredients_of(post_hoc)]
    assert m["post_hoc"] == post_hoc and len(m["merged"]) == len(parts) == len(want), (m["merged"], len(parts))
    for part, change in zip(parts, want):  # the same training with only the ingredient's change, and no post hoc
        assert part["post_hoc"] is None and part["finetuned"] is None  # (validation only: no test sets)
        assert part["train"] == {**m["train"], **change}, change
        assert part["config"] == m["config"]
    assert m["merged"] == [str(out / "ingredients" / str(i) / "model.pt") for i in range(len(want))]
    best = max(r["mean_map@20"] for r in m["post_hoc_curve"])  # validation chose the merge
    assert m["val"]["mean_map@20"] == best and m["post_hoc_chosen"] and m["finetuned"] is not None
