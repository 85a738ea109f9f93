"""The toy VLM and whole experiments.

Smoke-sized pretraining of the tiny config must beat chance on held-out image-text retrieval by a wide
margin; the cache must be reused and rebuilt when deleted; the CLI's --smoke experiment must write a
complete metrics.json (with the default toy VLM, which the test session shares through the cache)."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from infusing_kit import world
from infusing_kit.protocol import experiment
from infusing_kit.metrics import image_text_recall
from infusing_kit.models import embed_images, embed_texts
from infusing_kit.pretrain import SMOKE_PRETRAIN, cache_path, load_pretrained_toy
from conftest import HANG

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_pretraining_beats_chance_and_is_cached(tmp_path):
    cfg = replace(SMOKE_PRETRAIN, steps=150)
    vlm = load_pretrained_toy(cfg.model, cache_dir=tmp_path, cfg=cfg, progress=False)
    path = cache_path(cfg, tmp_path)
    assert path.exists()
    # (design 1: captions of spread-apart scenes; design 2's are one word apart, a test of the full model)
    w = world.make_world(world.WorldConfig(seed=5, design=1, **experiment.SMOKE_WORLD))
    rec = image_text_recall(embed_images(vlm, w.text_test.images, progress=False),
                            embed_texts(vlm, w.text_test.captions, progress=False), w.text_test.caption_image)
    chance = 2 / len(w.text_test.captions)
    assert rec["i2t_r@1"] > 8 * chance, rec
    mtime = path.stat().st_mtime_ns
    again = load_pretrained_toy(cfg.model, cache_dir=tmp_path, cfg=cfg, progress=False)
    assert path.stat().st_mtime_ns == mtime, "the cache was rewritten instead of reused"
    for a, b in zip(vlm.model.state_dict().values(), again.model.state_dict().values()):
        assert (a == b).all()
    path.write_bytes(b"broken")
    with pytest.raises(RuntimeError, match="delete it to pretrain again"):
        load_pretrained_toy(cfg.model, cache_dir=tmp_path, cfg=cfg, progress=False)


@pytest.mark.slow
def test_cli_smoke_experiment_writes_complete_metrics(smoke_reference):
    out = smoke_reference
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    m = json.loads((out / "metrics.json").read_text())
    for when in ("pretrained", "finetuned"):
        assert set(m[when]) == {"in_domain", "generic_image", "image_text"}
        assert {"map@20", "mmp@20", "r@1"} <= set(m[when]["in_domain"]) and {"map@20", "mmp@20", "r@1"} <= set(m[when]["generic_image"])
        assert {"i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5"} <= set(m[when]["image_text"])
        assert all(0 <= v <= 1 for d in m[when].values() for k, v in d.items() if k != "skipped")
    assert m["seed"] == 0 and m["smoke"] and m["train"]["steps"] == experiment.SMOKE_NAIVE.steps
    assert m["updates"] == {"target": m["train"]["steps"], "generic": 0, "backbone": m["train"]["steps"]}
    # forgetting shows even at smoke scale
    assert m["finetuned"]["image_text"]["i2t_r@1"] < m["pretrained"]["image_text"]["i2t_r@1"]
    assert len((out.parent / "results.jsonl").read_text().splitlines()) == 1
    cmd = [sys.executable, "-m", "infusing_kit", "experiment", "--preset", "toy-naive", "--smoke", "--out", str(out)]
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=HANG)
    assert again.returncode != 0 and "exists" in again.stderr, "an existing metrics.json must not be overwritten"


def test_unknown_preset_is_a_clear_cli_error():
    res = subprocess.run([sys.executable, "-m", "infusing_kit", "experiment", "--preset", "nope", "--out", "x"],
                         capture_output=True, text=True, cwd=ROOT, timeout=HANG)
    assert res.returncode == 2 and "toy-naive" in res.stderr


def test_every_preset_keeps_the_naive_schedule():
    for name, p in experiment.PRESETS.items():
        for cfg, base in ((p.train, experiment.NAIVE), (p.smoke_train, experiment.SMOKE_NAIVE)):
            factor = 2 if name == "toy-naive-long" else 1  # as many backbone updates as a round-robin method
            assert cfg.steps == factor * base.steps and cfg.batch_size == base.batch_size, name
        if not name.startswith("toy-naive") and not p.post_hoc and "select" not in p.ablation:
            assert p.train.select == "mean_map@20", f"{name} must select on mean validation (method.md 5)"
        if p.post_hoc:  # post hoc on naive's own training: the same config, kept by naive's rule
            assert p.train == experiment.NAIVE, name


def test_pretraining_gives_the_same_bits_with_one_and_two_threads(tmp_path):
    """Two fresh processes, 1 and 2 torch threads, the same small pretraining config: one fingerprint."""
    import subprocess
    import sys
    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); from dataclasses import replace; "
            "from infusing_kit.pretrain import SMOKE_PRETRAIN, pretrain, fingerprint; "
            "vlm, info = pretrain(replace(SMOKE_PRETRAIN, steps=6, batch_size=32), progress=False); "
            "print(torch.get_num_threads(), fingerprint(vlm))")
    outs = [subprocess.run([sys.executable, "-c", code, str(t)], capture_output=True, text=True, check=True,
                           cwd=tmp_path).stdout.split() for t in (1, 2)]
    assert outs[0][0] == "1" and outs[1][0] == "2", "the thread count of each process is restored after pretraining"
    assert outs[0][1] == outs[1][1]


def test_the_shipped_toy_vlm_is_the_default_pretraining():
    """The weights the kit ships are found for the default config and load into a model whose fingerprint every
    near-world run records."""
    from infusing_kit.pretrain import PretrainConfig, fingerprint, load_pretrained_toy, shipped_path
    assert shipped_path(PretrainConfig()).exists()
    vlm = load_pretrained_toy(cache_dir="/nonexistent-cache-folder", progress=False)
    assert fingerprint(vlm) == "96b818f7003cbb4e"


def test_a_cached_run_of_settings_the_preset_no_longer_holds_is_set_aside_and_trained_again(tmp_path, monkeypatch):
    """A chapter's cached run (experiment.cached_run) trained with a preset's old settings is moved aside, not
    reused and not deleted; a run of the current settings is reused."""
    import json
    from dataclasses import asdict, replace
    from infusing_kit.protocol import experiment
    current = asdict(replace(experiment.PRESETS["toy-naive"].smoke_train, seed=0))
    folder = tmp_path / "toy-naive-smoke-s0"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"train": {**current, "lr_backbone": 2 * current["lr_backbone"]}}))
    trained = []

    def train(preset, out, **kw):  # stands in for a run: writes what a run of the current settings writes
        trained.append(Path(out).name)
        Path(out).mkdir()
        (Path(out) / "metrics.json").write_text(json.dumps({"train": current}))
    monkeypatch.setattr(experiment, "run_experiment", train)
    monkeypatch.setattr(experiment, "load_run", lambda out, *a, **k: json.loads((Path(out) / "metrics.json").read_text()))
    assert experiment.cached_run("toy-naive", tmp_path, smoke=True)["train"] == current
    old = json.loads((tmp_path / "toy-naive-smoke-s0.stale-1" / "metrics.json").read_text())["train"]
    assert trained == ["toy-naive-smoke-s0"] and old["lr_backbone"] == 2 * current["lr_backbone"]
    experiment.cached_run("toy-naive", tmp_path, smoke=True)  # now current: reused
    assert trained == ["toy-naive-smoke-s0"] and not (tmp_path / "toy-naive-smoke-s0.stale-2").exists()


def test_a_post_hoc_row_says_what_validation_chose_and_a_plain_row_has_no_such_keys(tmp_path):
    # users of soups and WiSE-FT ask which interpolation or ingredients a number comes from (wise-ft#5,
    # model-soups#10): the registry row carries the chosen candidate (validation only) and the runs it merged
    reg = tmp_path / "reg.jsonl"
    m = experiment.run_experiment("toy-wise-ft", tmp_path / "wise", smoke=True, registry=reg)
    best = max(m["post_hoc_curve"], key=lambda r: r["mean_map@20"])
    row = json.loads(reg.read_text().splitlines()[-1])
    assert row["post_hoc"] == "wise_ft" and row["post_hoc_chosen"] == m["post_hoc_chosen"] == {"alpha": best["alpha"]}
    assert "merged" not in row  # WiSE-FT interpolates the seed's own run with the pretrained weights, nothing else
    plain = experiment.run_experiment("toy-naive", tmp_path / "naive", smoke=True, registry=reg,
                                      overrides={"steps": 4, "eval_every": 2})
    row = json.loads(reg.read_text().splitlines()[-1])
    assert plain["post_hoc_chosen"] is None and "post_hoc_chosen" not in row and "merged" not in row
