"""Hyper-parameter search bookkeeping, with the experiment replaced by a cheap fake (the real path runs in
notebook 09): trials never ask for test metrics, an interrupted study resumes without repeating its
start-up points, and the exported trial rows match the study."""
import json

import pytest

from infusing_kit import experiment, search as S
from infusing_kit.__main__ import main


@pytest.fixture
def fake(monkeypatch):
    calls = []

    def run(preset, out, smoke, seed, device, progress, overrides, test=True):
        calls.append({"preset": preset, "overrides": overrides, "test": test})
        x = overrides["l2sp"]
        return {"val": {"fine_map@20": 1 / (1 + x), "generic_map@20": x / (1 + x), "mean_map@20": 0.5 - abs(x - 3) / 100}}

    monkeypatch.setattr(S, "run_experiment", run)
    return calls


def test_search_uses_validation_only_and_resumes_without_repeats(tmp_path, fake):
    db = tmp_path / "s.db"
    S.search("toy-l2sp", 3, db, tmp_path / "runs", seed=0)
    assert len(fake) == 3 and not any(c["test"] for c in fake), "a trial evaluated test data"
    best = S.search("toy-l2sp", 6, db, tmp_path / "runs", seed=0)  # a second session continues the study
    values = [c["overrides"]["l2sp"] for c in fake]
    assert len(values) == 6 and len(set(values)) == 6, f"resumed study repeated trials: {values}"
    assert best["trials"] == 6 and best["value"] == max(0.5 - abs(v - 3) / 100 for v in values)
    lo, hi = experiment.PRESETS["toy-l2sp"].search[0][1:3]
    assert all(lo <= v <= hi for v in values)

    rows = S.trial_rows(db)
    assert sorted(r["params"]["l2sp"] for r in rows) == sorted(values)
    assert {r["method"] for r in rows} == {"toy-l2sp"} and all(set(r["val"]) >= {"mean_map@20"} for r in rows)

    out = tmp_path / "trials.jsonl"
    assert main(["trials", "--storage", str(db), "--out", str(out)]) == 0
    assert [json.loads(l) for l in out.read_text().splitlines()] == rows
    with pytest.raises(SystemExit):  # never overwrites
        main(["trials", "--storage", str(db), "--out", str(out)])


def test_presets_without_a_search_space_are_refused(tmp_path, fake):
    with pytest.raises(ValueError, match="no search space"):
        S.search("toy-naive", 2, tmp_path / "s.db", tmp_path / "runs")
