"""The whole-comparison command with the experiment replaced by a fake that writes what a real run writes
(metrics.json, run/log.jsonl, a registry row): the stages run in order, the schedule and the seed noise come from
the calibration curves, every method gets naive's learning rates and target steps, ablations take their base's
choice, the held-out presets also run on the held-out seeds, the second search seed's choices run there too,
post-hoc rows merge naive's runs without training, a run with other starting weights is refused, and a second
call reuses everything (nothing runs twice)."""
import json
import math
from pathlib import Path

import pytest

from conftest import FakeRunner
from infusing_kit.protocol import comparison as C, search as S


@pytest.fixture
def fake():
    """A runner (conftest.FakeRunner) whose runs write what a real run writes; .calls: the runs it was asked for;
    .weights[0]: the starting weights' fingerprint its runs record."""
    weights = ["w0"]

    def run(preset, out_dir, seed, overrides, test=True, smoke=False, registry=None, tags=None, **_):
        o = dict(overrides)
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
             "tags": tags or {}, "weights": weights[0], "threads": 1, "torch": "x", "device_kind": "cpu",
             "val": val, "best_step": steps, "updates": {"target": steps, "generic": 0, "backbone": steps},
             "seconds": 1.0,
             "pretrained": {"in_domain": {"map@20": 0.0}, "generic_image": {"map@20": 0.8}, "image_text": {"i2t_r@1": 0.7}},
             "finetuned": {"in_domain": {"map@20": val["fine_map@20"]}, "generic_image": {"map@20": 0.5},
                           "image_text": {"i2t_r@1": 0.2}} if test else None}
        (out / "metrics.json").write_text(json.dumps(m))
        if registry:
            from infusing_kit.protocol.results import append_result
            append_result(registry, m, run_dir=out)
        return m

    runner = FakeRunner(fake=run)
    object.__setattr__(runner, "weights", weights)  # (a frozen dataclass)
    return runner


# toy-lines: a post-hoc row outside the core table (its row runs in the first block, with naive's runs it merges)
PRESETS = ["toy-l2sp", "toy-paper", "toy-paper-no-l2sp", "toy-wise-ft", "toy-model-stock", "toy-l2-zero", "toy-lines"]
TRIALS = {"toy-naive": 16, "toy-l2sp": 8, "toy-paper": 16, "toy-l2-zero": 8}


def test_compare_runs_every_stage_in_order_and_resumes(tmp_path, fake):
    chosen = C.compare(tmp_path / "c", presets=PRESETS, trials=TRIALS, log=lambda *_: None, runner=fake)
    naive_trials = [c for c in fake.calls if c["preset"] == "toy-naive" and not c["test"] and c["overrides"]["steps"] == C.CALIBRATION_STEPS]
    assert len(naive_trials) >= 16 + 5  # the search, then the calibration on seeds 0-4
    steps = chosen["schedule"]["steps"]
    assert chosen["schedule"]["all_flat"] and 0 < steps < C.CALIBRATION_STEPS and steps % 25 == 0
    assert len(chosen["noise"]["kept"]) == 5 and chosen["noise"]["noise"] >= 0 and chosen["noise"]["naive_fine"] > 0
    base = chosen["toy-naive"]["params"]
    assert set(base) == {"lr_backbone", "lr_head", "steps"} and base["steps"] == steps
    # every method: naive's learning rates and target steps (toy-naive-long: twice the steps)
    for p in PRESETS:
        assert {k: chosen[p]["params"][k] for k in base} == base, p
    assert chosen["toy-naive-long"]["params"]["steps"] == 2 * steps
    assert chosen["toy-paper-no-l2sp"]["params"] == {**chosen["toy-paper"]["params"], "l2sp": 0.0}
    assert chosen["toy-paper@search1"]["search"]["study"].endswith("seed1")
    assert chosen["toy-l2sp"]["search"]["constraint"]["threshold"] == pytest.approx(
        C.CONSTRAINT * chosen["noise"]["naive_fine"])
    finals = [c for c in fake.calls if c["test"]]
    seeds = lambda p, **tag: sorted(c["seed"] for c in finals if c["preset"] == p and c["tags"] == tag)
    assert seeds("toy-naive", role="baseline") == seeds("toy-l2sp") == seeds("toy-paper") == [0, 1, 2, 3, 4, 5, 6, 7]
    assert seeds("toy-naive-long") == seeds("toy-paper-no-l2sp") == [0, 1, 2, 3, 4]
    assert seeds("toy-paper", search_seed=1) == [5, 6, 7]
    assert seeds("toy-l2-zero") == [0, 1, 2], "outside the core table: 3 final seeds"
    assert all(len(seeds(p, rule="constraint")) in (0, 3) for p in PRESETS), "the constraint rule: 3 seeds"
    # the core table's runs all come before any search of the other methods
    order = [c["preset"] for c in fake.calls]
    assert max(i for i, p in enumerate(order) if p == "toy-paper-no-l2sp") < order.index("toy-l2-zero")
    for c in finals:
        if c["tags"].get("rule") == "constraint":
            assert c["overrides"] == chosen[c["preset"]]["constraint_params"] != chosen[c["preset"]]["params"]
    # post hoc: naive's final run of the same seed, never trained again; Model Stock adds a second seed's run
    for c in finals:
        if c["preset"] in ("toy-wise-ft", "toy-model-stock", "toy-lines"):
            assert str(c["reuse"]).endswith(f"final/toy-naive-s{c['seed']}")
    stock = [c for c in finals if c["preset"] == "toy-model-stock"]
    assert len(stock) == 5 and all(str(c["merge_with"][0]).endswith(f"stock-s{c['seed'] + C.STOCK_SEED}/model.pt")
                                   for c in stock)
    searches = [c for c in fake.calls if not c["test"] and "ingredients" not in c["out"]]
    assert all(c["seed"] in C.SEARCH_SEEDS for c in searches) and not any(c["seed"] in C.HELDOUT_SEEDS for c in searches)
    rows = [json.loads(l) for l in (tmp_path / "c" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(finals)
    assert (tmp_path / "c" / "trials.jsonl").exists() and (tmp_path / "c" / "chosen.json").exists()

    n = len(fake.calls)
    again = C.compare(tmp_path / "c", presets=PRESETS, trials=TRIALS, log=lambda *_: None, runner=fake)
    assert len(fake.calls) == n, "a second call re-ran finished work"
    assert again["toy-l2sp"]["params"] == chosen["toy-l2sp"]["params"]


def test_a_budget_stops_at_a_clean_point_and_a_fresh_checkout_resumes_from_the_state(tmp_path, fake):
    """--budget: no new trial or run starts after the deadline; --state keeps what a fresh checkout needs (no
    weights), and the comparison finished from it equals one that never stopped."""
    whole = C.compare(tmp_path / "whole", presets=PRESETS, trials=TRIALS, log=lambda *_: None, runner=fake)
    n_whole = len(fake.calls)
    state = tmp_path / "state"
    from infusing_kit import budget
    with pytest.MonkeyPatch.context() as mp:  # the deadline passes halfway through (deterministically)
        passed = lambda: len(fake.calls) >= n_whole + n_whole // 2
        for module in (S, C, budget):
            mp.setattr(module, "deadline_passed", passed)
        first = C.compare(tmp_path / "a", presets=PRESETS, trials=TRIALS, log=lambda *_: None, runner=fake, budget=30, state=state)
    assert first["stopped"] and (state / "chosen.json").exists() and (state / "search.db").exists()
    assert not list(state.rglob("*.pt")), "the state holds no weights"
    n_first = len(fake.calls) - n_whole
    assert 0 < n_first < n_whole, "the first call should stop early"
    # a fresh checkout: a new --out, the same --state
    rest = C.compare(tmp_path / "b", presets=PRESETS, trials=TRIALS, log=lambda *_: None, runner=fake, state=state)
    assert "stopped" not in rest
    assert len(fake.calls) - n_whole - n_first < n_whole, "resuming ran everything again"
    strip = lambda ch: json.loads(json.dumps({k: v for k, v in ch.items() if k not in ("codes", "stopped")}))
    assert strip(rest) == strip(whole)
    rows = lambda d: sorted(json.dumps({k: r[k] for k in ("method", "seed", "finetuned", "train")}, sort_keys=True)
                            for r in map(json.loads, (d / "results.jsonl").read_text().splitlines()))
    assert rows(tmp_path / "b") == rows(tmp_path / "whole")
    with pytest.raises(FileExistsError, match="already holds"):
        C.restore_state(state, tmp_path / "b")


def test_a_run_with_other_starting_weights_is_refused(tmp_path, fake):
    C.compare(tmp_path / "c", presets=["toy-l2sp"], trials=TRIALS, log=lambda *_: None, runner=fake, stop_after=2)
    fake.weights[0] = "another model"
    with pytest.raises(ValueError, match="other starting weights"):
        C.compare(tmp_path / "c", presets=["toy-l2sp"], trials=TRIALS, log=lambda *_: None, runner=fake)


def test_seed_noise_and_the_naive_reference_by_hand():
    logs = [[{"target_step": t, "val/mean_map@20": m, "val/fine_map@20": f} for t, m, f in run]
            for run in ([(0, 0.1, 0.0), (25, 0.5, 0.6), (50, 0.6, 0.7), (75, 0.9, 0.95)],
                        [(0, 0.1, 0.0), (25, 0.4, 0.5), (50, 0.7, 0.8), (75, 0.2, 0.2)])]
    n = C.seed_noise(logs, steps=50)
    assert n["kept"] == [0.6, 0.7] and n["noise"] == pytest.approx(0.0707107, rel=1e-5)
    assert n["naive_fine"] == pytest.approx(0.75)


def test_a_preset_holding_the_comparisons_own_choice_is_not_a_change_but_another_value_is():
    from infusing_kit.protocol.fingerprint import differences, own_choices
    old = {"model": "m", "methods": {"toy-naive": {"steps": 200, "scale": 16.0},
                                     "toy-l2sp": {"steps": 200, "lr_backbone": 1e-3, "scale": 16.0}}}
    chosen = {"toy-naive": {"params": {"lr_backbone": 5e-4, "steps": 325}}, "toy-l2sp": {"params": {"l2sp": 3.0}}}
    # the presets now hold what the comparison chose (naive's schedule and learning rate, which every run overrides)
    now = {"model": "m", "methods": {"toy-naive": {"steps": 325, "scale": 16.0},
                                     "toy-l2sp": {"steps": 325, "lr_backbone": 5e-4, "scale": 16.0},
                                     "toy-new": {"steps": 325, "scale": 16.0}}}
    assert differences(old, now)  # compared as they are, they differ
    kept = own_choices(old, now, chosen, "toy-naive")
    assert differences(old, kept) == [] and kept["methods"]["toy-new"] == now["methods"]["toy-new"]
    # a fixed field the comparison never chose, or a value other than its choice, is still a change
    for m, k, v in (("toy-naive", "scale", 32.0), ("toy-l2sp", "steps", 300)):
        other = json.loads(json.dumps(now))
        other["methods"][m][k] = v
        assert differences(old, own_choices(old, other, chosen, "toy-naive")) == [f"{m}: fixed field {k} "
                                                                                   f"{old['methods'][m][k]!r} -> {v!r}"]
    assert own_choices(None, now, chosen, "toy-naive") is now
