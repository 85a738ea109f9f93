"""The whole-comparison command with the experiment replaced by a fake that writes what a real run writes
(metrics.json, run/log.jsonl, a registry row): the stages run in order, the schedule comes from the flat
calibration curves, every method gets naive's learning rates and target steps, toy-naive and toy-paper also run
on the held-out seeds, and a second call reuses everything (nothing runs twice)."""
import json
import math
from pathlib import Path

import pytest

from infusing_kit import comparison as C, search as S


@pytest.fixture
def fake(monkeypatch):
    calls = []

    def run(preset, out_dir, smoke=False, seed=0, device="cpu", progress=False, overrides=None, test=True,
            registry=None, hooks=()):
        o = dict(overrides)
        calls.append({"preset": preset, "seed": seed, "overrides": o, "test": test})
        lr = o.get("lr_backbone", 1e-3)
        speed = 1 / (1 + abs(math.log10(lr) + 3))  # fastest at 1e-3
        steps = o["steps"]
        log = [{"step": s, "target_step": s, "val/fine_map@20": 0.95 * (1 - math.exp(-speed * s / 40)),
                "val/generic_map@20": 0.8, "val/mean_map@20": 0.5} for s in range(0, steps + 1, 25)]
        for h in log:
            h["val/mean_map@20"] = (h["val/fine_map@20"] + 0.8 * (1 - o.get("l2sp", 0) / 1e4)) / 2
        out = Path(out_dir)
        (out / "run").mkdir(parents=True)
        (out / "run" / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in log))
        val = {k[4:]: v for k, v in log[-1].items() if k.startswith("val/")}
        m = {"preset": preset, "seed": seed, "smoke": smoke, "overrides": o, "train": {**o, "seed": seed},
             "val": val, "best_step": steps, "updates": {"target": steps, "generic": 0, "backbone": steps},
             "seconds": 1.0,
             "pretrained": {"in_domain": {"map@20": 0.0}, "generic_image": {"map@20": 0.8}, "image_text": {"i2t_r@1": 0.7}},
             "finetuned": {"in_domain": {"map@20": val["fine_map@20"]}, "generic_image": {"map@20": 0.5},
                           "image_text": {"i2t_r@1": 0.2}} if test else None}
        (out / "metrics.json").write_text(json.dumps(m))
        if registry:
            from infusing_kit.results import append_result
            append_result(registry, m, run_dir=out)
        return m

    monkeypatch.setattr(C, "run_experiment", run)
    monkeypatch.setattr(S, "run_experiment", run)
    return calls


def test_compare_runs_every_stage_in_order_and_resumes(tmp_path, fake):
    chosen = C.compare(tmp_path / "c", presets=["toy-l2sp", "toy-wise-ft"], trials={"toy-naive": 16, "toy-l2sp": 8},
                       log=lambda *_: None)
    naive_trials = [c for c in fake if c["preset"] == "toy-naive" and not c["test"] and c["overrides"]["steps"] == C.CALIBRATION_STEPS]
    assert len(naive_trials) >= 16 + 3  # the search, then the calibration on seeds 0-2
    steps = chosen["schedule"]["steps"]
    assert chosen["schedule"]["all_flat"] and 0 < steps < C.CALIBRATION_STEPS and steps % 25 == 0
    base = chosen["toy-naive"]["params"]
    assert set(base) == {"lr_backbone", "lr_head", "steps"} and base["steps"] == steps
    # every method: naive's learning rates and target steps (toy-naive-long: twice the steps)
    for p in ("toy-l2sp", "toy-wise-ft"):
        assert {k: chosen[p]["params"][k] for k in base} == base, p
    assert chosen["toy-naive-long"]["params"]["steps"] == 2 * steps
    finals = [(c["preset"], c["seed"]) for c in fake if c["test"]]
    assert sorted(s for p, s in finals if p == "toy-naive") == [0, 1, 2, 3, 4]
    assert sorted(s for p, s in finals if p == "toy-l2sp") == [0, 1, 2]
    assert sorted(s for p, s in finals if p == "toy-naive-long") == [0, 1, 2]
    searches = [c for c in fake if not c["test"]]
    assert all(c["seed"] in (0, 1, 2) for c in searches) and not any(c["seed"] in (3, 4) for c in searches)
    rows = [json.loads(l) for l in (tmp_path / "c" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(finals)
    assert (tmp_path / "c" / "trials.jsonl").exists() and (tmp_path / "c" / "chosen.json").exists()

    n = len(fake)
    again = C.compare(tmp_path / "c", presets=["toy-l2sp", "toy-wise-ft"], trials={"toy-naive": 16, "toy-l2sp": 8},
                      log=lambda *_: None)
    assert len(fake) == n, "a second call re-ran finished work"
    assert again["toy-l2sp"]["params"] == chosen["toy-l2sp"]["params"]
