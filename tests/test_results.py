"""The comparison helpers the chapters call: registry reads, trials files, dominance, WiSE-FT on validation."""
import json
from pathlib import Path

import pytest
import torch

from infusing_kit import experiment, world as W
from infusing_kit.models import load_model
from infusing_kit.regularizers import wise_ft
from infusing_kit.results import dominating, load_trials, summarise

ROOT = Path(__file__).resolve().parents[1]
COMPARISON = ROOT / "results" / "toy-comparison-gpu.jsonl"
TRIALS = ROOT / "results" / "toy-search-gpu.jsonl"


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
    rows, histories = experiment.chapter_rows(["toy-naive", "toy-l2sp"], tmp_path / "nothing-trains-here",
                                              comparison=COMPARISON)
    assert histories == {} and not (tmp_path / "nothing-trains-here").exists()
    assert sorted((r["method"], r["seed"]) for r in rows) == [(m, s) for m in ("toy-l2sp", "toy-naive") for s in (0, 1, 2)]
    reg = tmp_path / "r.jsonl"
    reg.write_text(json.dumps(_row("toy-naive", 0, 0.5, -0.3, -0.6)) + "\n")
    with pytest.raises(ValueError, match=r"no finished rows for \['toy-l2sp'\]"):
        experiment.chapter_rows(["toy-naive", "toy-l2sp"], tmp_path, comparison=reg)
    with pytest.raises(ValueError, match="unknown presets"):
        experiment.chapter_rows(["toy-nope"], tmp_path, comparison=reg)


def test_committed_trials_match_the_presets_they_chose():
    trials = load_trials(TRIALS)
    assert trials and all(set(t["val"]) >= {"fine_map@20", "generic_map@20", "mean_map@20"} for t in trials)
    for method in ("toy-paper", "toy-l2sp", "toy-relational", "toy-lwf"):
        best = max(load_trials(TRIALS, method), key=lambda t: t["val"]["mean_map@20"])
        for k, v in best["params"].items():
            assert getattr(experiment.PRESETS[method].train, k) == pytest.approx(v, rel=0.01), (method, k)
    with pytest.raises(ValueError, match="not a trials file"):
        load_trials(COMPARISON)


def test_wise_ft_curve_endpoints_are_the_two_models():
    world = W.make_world(W.WorldConfig(seed=3, generic_train=50, generic_val_combos=10, generic_test_combos=10,
                                       text_pairs=10, fine_train_classes=6, fine_val_classes=4, fine_test_classes=4,
                                       fine_per_class=4))
    torch.manual_seed(0)
    vlm = load_model("toy-clip-tiny", pretrained=None)
    theta0 = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    with torch.no_grad():
        for p in vlm.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    theta1 = {k: v.clone() for k, v in vlm.visual.state_dict().items()}
    validate = experiment.validation_fn(world)
    at1 = validate(vlm)
    curve = experiment.wise_ft_curve(vlm, theta0, world, alphas=[0.0, 0.5, 1.0])
    assert all(torch.equal(v, theta1[k]) for k, v in vlm.visual.state_dict().items()), "vlm not handed back at theta1"
    assert curve[2] == {"alpha": 1.0, **at1}
    vlm.visual.load_state_dict(theta0)
    assert curve[0] == {"alpha": 0.0, **validate(vlm)}
    vlm.visual.load_state_dict(theta1)
    chosen = experiment.apply_wise_ft(vlm, theta0, curve, key="generic_map@20")
    assert chosen == max(curve, key=lambda r: r["generic_map@20"])
    want = wise_ft(theta0, theta1, chosen["alpha"])
    assert all(torch.equal(v, want[k]) for k, v in vlm.visual.state_dict().items())
