"""A long job's budget and the values a comparison's runs share (infusing_kit/budget.py): computed once inside a
comparison, never outside it, and the same bits as computing them again; the resumable state holds no weights."""
import json

import torch

from infusing_kit import budget
from infusing_kit.methods import inputs
from infusing_kit.protocol import experiment
from infusing_kit.world import domains

from conftest import tiny_world_and_model


def test_a_cached_value_is_computed_once_inside_a_comparison_and_never_outside(tmp_path, monkeypatch):
    calls = []
    compute = lambda: calls.append(1) or {"x": 0.1 + 0.2}
    monkeypatch.delenv(budget.CACHE, raising=False)
    assert budget.cached("k", "a", compute) == budget.cached("k", "a", compute) and len(calls) == 2
    monkeypatch.setenv(budget.CACHE, str(tmp_path / "cache"))
    first, again = budget.cached("k", "a", compute), budget.cached("k", "a", compute)
    assert len(calls) == 3 and first == again == {"x": 0.1 + 0.2}   # (JSON keeps a float's every bit)
    budget.cached("k", "b", compute)
    assert len(calls) == 4, "another key is another value"


def test_the_cached_fisher_and_pretrained_test_metrics_are_the_bits_a_run_would_compute(tmp_path, monkeypatch):
    world, vlm = tiny_world_and_model()
    d = domains(world)
    ctx = {"fisher_images": 20, "progress": False}
    monkeypatch.delenv(budget.CACHE, raising=False)
    fresh = inputs._fisher(vlm, d, None, ctx)
    metrics = experiment.evaluate(vlm, d)
    monkeypatch.setenv(budget.CACHE, str(tmp_path / "cache"))
    ident = experiment.run_identity(vlm, "cpu")
    for _ in range(2):  # the first call computes and writes, the second reads
        cached = inputs._fisher(vlm, d, None, ctx)
        assert set(cached) == set(fresh) and all(torch.equal(cached[k], fresh[k]) for k in fresh)
        assert experiment._pretrained_test(vlm, d, ident) == json.loads(json.dumps(metrics))
    assert len(list((tmp_path / "cache" / "fisher").iterdir())) == 1
    assert len(list((tmp_path / "cache" / "pretrained-test").iterdir())) == 1
    # other weights: another key, not a stale value
    with torch.no_grad():
        next(vlm.visual.parameters()).add_(0.01)
    other = inputs._fisher(vlm, d, None, ctx)
    assert any(not torch.equal(other[k], fresh[k]) for k in fresh)
    assert len(list((tmp_path / "cache" / "fisher").iterdir())) == 2


def test_the_state_of_a_comparison_holds_no_weights_and_comes_back_whole(tmp_path):
    out, state = tmp_path / "out", tmp_path / "state"
    for rel, text in (("chosen.json", "{}"), ("results.jsonl", "{}\n"), ("runs/final/a-s0/metrics.json", "{}"),
                      ("runs/final/a-s0/run/log.jsonl", "{}\n"), ("runs/final/a-s0/model.pt", "w"),
                      ("runs/search/t/trial000/metrics.json", "{}")):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    budget.save_state(out, state)
    kept = sorted(str(p.relative_to(state)) for p in state.rglob("*") if p.is_file())
    assert kept == ["chosen.json", "results.jsonl", "runs/final/a-s0/metrics.json", "runs/final/a-s0/run/log.jsonl"]
    budget.restore_state(state, tmp_path / "fresh")
    back = sorted(str(p.relative_to(tmp_path / "fresh")) for p in (tmp_path / "fresh").rglob("*") if p.is_file())
    assert back == kept
