"""The comparison helpers the chapters call: registry reads, trials files, dominance, WiSE-FT on validation."""
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_world_and_model
from infusing_kit import experiment
from infusing_kit.regularizers import wise_ft
from infusing_kit.results import dominating, load_trials, summarise

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "results" / "toy-protocol-cpu-v2.json"
CHOSEN = ROOT / "results" / "toy-chosen-cpu-v2.json"
TRIALS = ROOT / "results" / "toy-trials-cpu-v2.jsonl"


def _row(method, seed, fine, generic, i2t):
    zero = {"in_domain": {"map@20": 0.0}, "generic_image": {"map@20": 0.0}, "image_text": {"i2t_r@1": 0.0}}
    return {"method": method, "seed": seed, "smoke": False, "pretrained": zero,
            "finetuned": {"in_domain": {"map@20": fine}, "generic_image": {"map@20": generic},
                          "image_text": {"i2t_r@1": i2t}}}


def test_dominating_needs_all_three_axes_better():
    s = summarise([_row("toy-naive", 0, 0.5, -0.3, -0.6), _row("toy-paper", 0, 0.4, -0.1, -0.2),
                   _row("a", 0, 0.5, -0.05, -0.1), _row("b", 0, 0.6, -0.2, -0.1)])
    assert dominating(s, "toy-paper") == ["a"]
    with pytest.raises(KeyError, match="not in the summary"):
        dominating(s, "missing")


def test_chapter_rows_read_a_registry_without_training(tmp_path):
    full = tmp_path / "full.jsonl"
    full.write_text("".join(json.dumps(_row(m, s, 0.5, -0.3, -0.6)) + "\n" for m in ("toy-naive", "toy-l2sp", "toy-ewc")
                            for s in (0, 1, 2)))
    rows, histories = experiment.chapter_rows(["toy-naive", "toy-l2sp"], tmp_path / "nothing-trains-here",
                                              comparison=full)
    assert histories == {} and not (tmp_path / "nothing-trains-here").exists()
    assert sorted((r["method"], r["seed"]) for r in rows) == [(m, s) for m in ("toy-l2sp", "toy-naive") for s in (0, 1, 2)]
    reg = tmp_path / "r.jsonl"
    reg.write_text(json.dumps(_row("toy-naive", 0, 0.5, -0.3, -0.6)) + "\n")
    with pytest.raises(ValueError, match=r"no finished rows for \['toy-l2sp'\]"):
        experiment.chapter_rows(["toy-naive", "toy-l2sp"], tmp_path, comparison=reg)
    with pytest.raises(ValueError, match="unknown presets"):
        experiment.chapter_rows(["toy-nope"], tmp_path, comparison=reg)


def test_the_presets_are_the_committed_validation_choices():
    # the comparison's first stages chose naive's learning rates and schedule and toy-paper's three fields; the
    # presets the chapters train must be those choices (rounded to 3 digits), not values set by hand
    protocol = json.loads(PROTOCOL.read_text())
    naive = experiment.PRESETS["toy-naive"].train
    for k, v in protocol["toy-naive"]["params"].items():
        assert getattr(naive, k) == pytest.approx(v, rel=0.01), ("toy-naive", k)
    assert naive.steps == protocol["schedule"]["steps"] and experiment.PRESETS["toy-naive-long"].train.steps == 2 * naive.steps
    trials = load_trials(TRIALS)
    assert trials and all(set(t["val"]) >= {"fine_map@20", "generic_map@20", "mean_map@20"} for t in trials)
    chosen = {m: c for m, c in json.loads(CHOSEN.read_text()).items() if isinstance(c, dict) and "params" in c}
    chosen.setdefault("toy-paper", protocol["toy-paper"])
    for method, c in chosen.items():
        if method in experiment.PENDING:
            continue
        key = "fine_map@20" if method == "toy-naive" else "mean_map@20"  # naive's search objective is fine-grained
        best = max((t for t in load_trials(TRIALS, method) if t["state"] == "complete"),
                   key=lambda t: t["val"][key]) if experiment.PRESETS[method].search else None
        for k, v in c["params"].items():
            assert getattr(experiment.PRESETS[method].train, k) == pytest.approx(v, rel=0.01), (method, k)
        if best is not None:
            assert best["params"] == c["search"]["params"], method
    for method, preset in experiment.PRESETS.items():
        assert preset.train.steps == naive.steps * (2 if method == "toy-naive-long" else 1), method
    with pytest.raises(ValueError, match="not a trials file"):
        load_trials(ROOT / "results" / "superseded" / "toy-comparison-gpu.jsonl")


def test_wise_ft_curve_endpoints_are_the_two_models():
    world, vlm = tiny_world_and_model()
    theta0 = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    with torch.no_grad():
        for p in vlm.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theta1 = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    validate = experiment.validation_fn(world)
    at1 = validate(vlm)
    from infusing_kit import posthoc
    curve, chosen = posthoc.choose("wise_ft", vlm, theta0, [theta1], validate, "generic_map@20")
    assert [r["alpha"] for r in curve] == list(posthoc.ALPHAS)
    assert curve[-1] == {"alpha": 1.0, **at1}
    assert chosen == max(curve, key=lambda r: r["generic_map@20"])
    here = validate(vlm)  # the tower is left at the chosen interpolation
    vlm.visual.load_state_dict(theta0)
    assert curve[0] == {"alpha": 0.0, **validate(vlm)}
    assert here == {k: v for k, v in chosen.items() if k != "alpha"}
    want = wise_ft(theta0, theta1, chosen["alpha"])
    vlm.visual.load_state_dict(want)
    assert validate(vlm) == here
