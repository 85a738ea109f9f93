"""The comparison helpers the chapters call: registry reads, trials files, dominance, WiSE-FT on validation."""
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from conftest import tiny_world_and_model
from infusing_kit.protocol import experiment
from infusing_kit.protocol.presets import CHOSEN_FILE, PRESETS
from infusing_kit.pretrain import fingerprint, load_pretrained_toy
from infusing_kit.methods.merges import wise_ft
from infusing_kit.protocol.results import claim, current, dominating, label, load_results, load_trials, summarise, winners
from infusing_kit.trainconfig import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CHOSEN = ROOT / "results" / CHOSEN_FILE
TRIALS = ROOT / "results" / "toy-trials-near-cpu-v4b.jsonl"
REGISTRY = ROOT / "results" / "toy-comparison-near-cpu-v4b.jsonl"


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
    # the near world's comparison chose naive's learning rates and schedule and every method's strengths
    # (results/toy-chosen-near-cpu-v4b.json); the presets the chapters train hold those choices exactly, and a preset
    # with a seed trains exactly what the comparison's row of that seed trained
    chosen = json.loads(CHOSEN.read_text())
    naive = PRESETS["toy-naive"].train
    assert chosen["identity"]["weights"] == fingerprint(load_pretrained_toy(progress=False)), \
        "the committed choices were made on another toy VLM"
    assert naive.steps == chosen["schedule"]["steps"] and PRESETS["toy-naive-long"].train.steps == 2 * naive.steps
    trials = load_trials(TRIALS)
    assert trials and all(set(t["val"]) >= {"fine_map@20", "generic_map@20", "mean_map@20"} for t in trials)
    done = {m: c for m, c in chosen.items() if m in PRESETS and "params" in c}
    assert set(done) >= {m for m, p in PRESETS.items() if p.search}, "a searched preset has no committed choice"
    for method, c in done.items():
        for k, v in c["params"].items():
            assert getattr(PRESETS[method].train, k) == v, (method, k)
    rows = [r for r in load_results(REGISTRY, smoke=False) if label(r) == r["method"]]
    assert {r["method"] for r in rows} == set(PRESETS)
    off = json.loads(json.dumps(asdict(TrainConfig())))
    for r in rows:  # every main-choice row of the comparison is its preset at that seed, field for field (a field
        # added after a row was trained is off in that row: at its default)
        want = json.loads(json.dumps(asdict(replace(PRESETS[r["method"]].train, seed=r["train"]["seed"]))))
        got = {**{k: off[k] for k in want if k not in r["train"]}, **r["train"]}
        assert got == want, (r["method"], r["seed"], {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v})
    for method, preset in PRESETS.items():
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
    from infusing_kit.methods import posthoc
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


def test_current_names_existing_files_and_none_for_a_missing_kind(tmp_path):
    for world in ("near", "far"):  # every file the kit's manifest names is there, outside superseded/
        names = json.loads((ROOT / "results" / "current.json").read_text())["worlds"][world]
        for kind in names:
            assert current(world, kind).parent == ROOT / "results"
    m = tmp_path / "current.json"
    (tmp_path / "a.jsonl").write_text("")
    m.write_text(json.dumps({"worlds": {"near": {"comparison": "a.jsonl", "trials": "gone.jsonl"}}}))
    assert current("near", "comparison", m) == tmp_path / "a.jsonl"
    assert current("near", "report", m) is None
    with pytest.raises(FileNotFoundError, match="gone.jsonl"):
        current("near", "trials", m)
    with pytest.raises(ValueError, match="no world 'far'"):
        current("far", manifest=m)


def test_a_chapter_reads_its_worlds_current_comparison_and_trains_here_when_there_is_none(tmp_path, monkeypatch):
    from infusing_kit.protocol import results
    from infusing_kit.teaching import chapters
    res = tmp_path / "results"
    res.mkdir()
    (res / "reg.jsonl").write_text("".join(json.dumps(_row(m, s, 0.5, -0.3, -0.6)) + "\n"
                                           for m in ("toy-naive", "toy-l2sp", "toy-ewc") for s in (0, 1, 5))
                           + json.dumps(_row("toy-naive", 7, 0.5, -0.3, -0.6)) + "\n"  # a seed L2-SP never ran
                           + json.dumps({**_row("toy-l2sp", 0, 0.1, 0, 0), "tags": {"rule": "constraint"}}) + "\n")
    (res / "tr.jsonl").write_text("".join(json.dumps({"method": "toy-l2sp", "trial": i, "state": st, "params": {"l2sp": i}})
                                          + "\n" for i, st in enumerate(("complete", "pruned", "complete"))))
    (res / "far.jsonl").write_text(json.dumps(_row("toy-naive", 0, 0.9, -0.9, -0.9)) + "\n")
    (res / "current.json").write_text(json.dumps({"worlds": {"near": {"comparison": "reg.jsonl", "trials": "tr.jsonl"},
                                                             "far": {"comparison": "far.jsonl"}, "empty": {}}}))
    monkeypatch.setattr(results, "RESULTS", res)
    got = chapters.compared(["toy-naive", "toy-l2sp"], tmp_path / "runs")
    assert sorted((r["method"], r["seed"]) for r in got.rows) == [(m, s) for m in ("toy-l2sp", "toy-naive") for s in (0, 1, 5)]
    assert got.histories == {} and not (tmp_path / "runs").exists()
    assert got.source == ("the near world's current comparison reg.jsonl (seeds 0, 1, 5, those every method here "
                          "ran: 6 runs)"), got.source
    assert [t["trial"] for t in got.trials("toy-l2sp")] == [0, 2] and got.trials("toy-ewc") == []
    with pytest.raises(ValueError, match="no finished rows for"):  # the far world has no L2-SP: no mixing worlds
        chapters.compared(["toy-naive", "toy-l2sp"], tmp_path / "runs", world="far")
    trained = []  # a world with no current comparison, SMOKE, or comparison=None: the presets train here
    monkeypatch.setattr(chapters, "chapter_rows", lambda presets, root, **kw: trained.append(kw) or ([], {"p": []}))
    for kw in ({"world": "empty"}, {"smoke": True}, {"comparison": None}):
        got = chapters.compared(["toy-naive"], tmp_path / "runs", **kw)
        assert got.source.startswith("trained here") and got.histories == {"p": []}
        assert trained[-1].get("comparison") is None
        assert got.trials_path == (None if kw.get("world") == "empty" else res / "tr.jsonl")  # validation only
    assert "SMOKE" in chapters.compared(["toy-naive"], tmp_path, smoke=True).source


def test_rank_correlation_compares_validation_with_test_orders_and_keeps_tagged_variants_apart():
    from infusing_kit.protocol.results import rank_correlation

    def row(method, seed, val, test, **extra):
        r = _row(method, seed, test, test / 2, 0.0)
        return {**r, "val": {"fine_map@20": val, "generic_map@20": val / 2}, **extra}
    same = [row(m, s, v + s / 100, v + s / 100) for m, v in (("a", 0.1), ("b", 0.5), ("c", 0.9)) for s in (0, 1)]
    rc = rank_correlation(same + [_row("no-val", 0, 0.3, 0.1, 0.0)])  # a row without validation is skipped
    assert (rc["runs"], rc["methods"]) == (6, 3)
    assert all(rc[lv][k] == pytest.approx(1.0) for lv in ("over runs", "over method means") for k in ("fine", "mean"))
    flipped = rank_correlation([row(m, 0, v, 1 - v) for m, v in (("a", 0.1), ("b", 0.5), ("c", 0.9))])
    assert flipped["over runs"]["mean"] == pytest.approx(-1.0)
    tagged = rank_correlation(same + [row("a", 0, 0.3, 0.3, tags={"rule": "constraint"})])
    assert tagged["methods"] == 4  # 'a [constraint rule]' is a method of its own


def test_claim_gives_ratios_with_intervals_over_seeds_and_points():
    rows = [_row("toy-naive", s, 0.30, -0.20, -0.40) for s in (0, 1, 2)]
    rows += [_row("toy-paper", s, 0.27 + 0.01 * s, -0.02, -0.04) for s in (0, 1, 2)]
    c = claim(rows)
    kept = c["ratios"]["gain_kept"]
    assert kept["mean"] == pytest.approx(0.28 / 0.30) and kept["low"] < kept["mean"] < kept["high"]
    assert c["ratios"]["generic_drop_left"]["mean"] == pytest.approx(0.1)
    assert c["points"]["toy-naive"]["fine"] == pytest.approx(30.0) and c["passed"]
    assert claim(rows, seeds=[1])["seeds"] == [1]


def test_each_rule_has_its_winner_and_says_when_the_win_is_within_noise():
    rows = [_row("toy-naive", s, 0.50, 0.20, 0.1) for s in (0, 1, 2)]
    rows += [_row("a", s, 0.49, 0.40 + 0.01 * s, 0.1) for s in (0, 1, 2)]   # mean rule: a
    rows += [_row("b", s, 0.40, 0.45, 0.1) for s in (0, 1, 2)]              # more generic, but below the floor
    c = _row("b", 0, 0.48, 0.43, 0.1)
    c["tags"] = {"rule": "constraint"}
    w = winners(rows + [c])
    assert w["mean"]["winner"] == "a" and w["mean"]["runner_up"] == "b"
    assert w["constraint"]["winner"] == "b" and w["constraint"]["floor"] == pytest.approx(0.475)
    assert w["constraint"]["margin"]["seeds"] == [0]   # b's constraint row ran on seed 0 only
    assert winners(rows)["constraint"]["winner"] == "a"  # without it, b's mean-rule choice is below the floor


def test_finish_comparison_reports_every_table_and_refuses_an_unfinished_one(tmp_path):
    import importlib.util
    import subprocess
    import sys
    spec = importlib.util.spec_from_file_location("finish", ROOT / "scripts" / "finish_comparison.py")
    finish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finish)
    rows = []
    for m, fine, gen in (("toy-naive", 0.30, -0.20), ("toy-paper", 0.28, -0.02), ("toy-l2sp", 0.2, -0.1)):
        for s in (0, 1, 2, 5, 6):
            r = _row(m, s, fine + 0.002 * s, gen - 0.001 * s, -0.3 if m == "toy-naive" else -0.05)
            r["val"] = {"fine_map@20": fine + 0.002 * s, "generic_map@20": 0.5 + gen}
            rows.append(r)
    chosen = {"study": {"protocol": {"baseline": "toy-naive", "final_seeds": [0, 1, 2], "heldout_seeds": [5, 6]}}}
    data, md = finish.report(rows, chosen, far=None)
    assert data["claim"]["held-out seeds"]["seeds"] == [5, 6] and data["claim"]["final seeds"]["seeds"] == [0, 1, 2]
    assert data["winners"]["mean"]["winner"] == "toy-paper"
    assert data["rank_correlation"]["over method means"]["mean"] == pytest.approx(1.0)
    for heading in ("Points beside the paper", "against toy-naive", "against the combination", "claim", "winner",
                    "Spearman"):
        assert heading in md
    runs = tmp_path / "state" / "runs" / "final"
    for name, m in (("toy-wise-ft-s0", {"post_hoc": "wise_ft", "post_hoc_curve": [
                        {"alpha": 0.5, "mean_map@20": 0.7}, {"alpha": 0.8, "mean_map@20": 0.8}], "merged": []}),
                    ("toy-soup-greedy-s1", {"post_hoc": "soup_greedy", "post_hoc_curve": [
                        {"candidate": 0, "mean_map@20": 0.8}, {"candidate": 1, "mean_map@20": 0.6},
                        {"ingredients": [0], "mean_map@20": 0.8}], "merged": ["runs/ingredients/soup0-s1/model.pt"]}),
                    ("toy-naive-s0", {"post_hoc": None})):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps(
            {"preset": name.rsplit("-s", 1)[0], "seed": int(name[-1]), "tags": {}, "val": {"mean_map@20": 0.8}, **m}))
    data, md = finish.report(rows, chosen, far=None, folder=tmp_path / "state")
    assert data["posthoc"] == [
        {"method": "toy-soup-greedy", "seed": 1, "rule": "mean", "chosen": {"ingredients": [0]}, "candidates": 2,
         "merged": ["soup0-s1"]},
        {"method": "toy-wise-ft", "seed": 0, "rule": "mean", "chosen": {"alpha": 0.8}, "candidates": 2, "merged": []}]
    assert "| toy-soup-greedy | 1 | ingredients [0] | 2 | soup0-s1 |" in md
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "chosen.json").write_text(json.dumps({**chosen, "stopped": "the --budget ran out"}))
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "finish_comparison.py"), str(out), "--world", "near",
                        "--tag", "t", "--results", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and "has not finished" in p.stderr


def test_main_choices_shared_seeds_and_the_two_worlds_table(tmp_path):
    from infusing_kit.protocol.results import main_choices, world_summary, worlds_table
    rows = [_row("toy-naive", s, 0.5, -0.2, -0.4) for s in (0, 1, 2)] + \
           [_row("toy-paper", s, 0.3 + 0.1 * s, -0.1, -0.1) for s in (0, 1)] + \
           [{**_row("toy-paper", 0, 0.9, 0.0, 0.0), "tags": {"rule": "constraint"}}]
    assert len(main_choices(rows)) == 5  # the constraint rule's row is a variant, not the main choice
    assert sorted({r["seed"] for r in main_choices(rows, seeds="shared")}) == [0, 1]  # toy-paper has no seed 2
    path = tmp_path / "reg.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    near = world_summary(path)
    assert set(near) == {"toy-naive", "toy-paper"} and near["toy-paper"]["seeds"] == 2
    assert near["toy-paper"]["fine_mean"] == pytest.approx(0.35) and near["toy-paper"]["gain_kept"] == pytest.approx(
        0.7) and near["toy-paper"]["generic_drop_left"] == pytest.approx(0.5)
    table = worlds_table({"near": near, "far": {"toy-naive": near["toy-naive"]}}).splitlines()
    assert table[0].startswith("| method | near: gain (kept)") and len(table) == 4
    assert table[3] == "| toy-paper | +35.0 (70%) | -10.0 (50%) | -10.0 (25%) |  |  |  |"  # no far row: blank
    with pytest.raises(FileNotFoundError, match="no such registry"):
        world_summary(tmp_path / "missing.jsonl")


def test_every_registry_row_is_built_by_one_function(tmp_path):
    """`registry.row_of` makes the row `append_result` writes and the rows a chapter compares; a field it does not
    know is refused (a typo would otherwise give a row the tables silently ignore)."""
    from infusing_kit.protocol.registry import append_result, row_of
    zero = _row("x", 0, 0.0, 0.0, 0.0)["pretrained"]
    metrics = {"preset": "toy-naive", "seed": 3, "smoke": False, "train": {"steps": 5}, "val": {"fine_map@20": 0.4},
               "pretrained": zero, "finetuned": _row("x", 0, 0.5, -0.3, -0.6)["finetuned"], "seconds": 1.5,
               "post_hoc_chosen": {"alpha": 0.4}}
    written = append_result(tmp_path / "r.jsonl", metrics, run_dir=tmp_path / "run")
    again = row_of(metrics, tmp_path / "run")
    assert {k: v for k, v in written.items() if k != "finished"} == {k: v for k, v in again.items() if k != "finished"}
    assert written["method"] == "toy-naive" and written["post_hoc_chosen"] == {"alpha": 0.4}
    merged = row_of(metrics, method="toy-wise-ft", finetuned=zero)
    assert merged["method"] == "toy-wise-ft" and merged["finetuned"] == zero and merged["seed"] == 3
    assert summarise([written, merged])[1]["fine_mean"] == 0.0
    with pytest.raises(ValueError, match=r"\['finetune'\] are not fields of a registry row"):
        row_of(metrics, finetune=zero)
    with pytest.raises(ValueError, match="no 'seconds'"):
        append_result(tmp_path / "r.jsonl", {k: v for k, v in metrics.items() if k != "seconds"})
