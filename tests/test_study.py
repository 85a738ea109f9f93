"""Studies: the protocol on any model and data from one file. The built-in comparison exported as a study file on
the exported world reproduces the built-in comparison exactly (choices and metrics); a study file's keys are
checked; trials of a study name what they are in their attributes."""
import json
from pathlib import Path

import pytest

from infusing_kit.protocol import comparison as C
from infusing_kit.protocol.export import study_text
from infusing_kit.protocol.presets import LR_SPACE
from infusing_kit.protocol.results import label, load_results
from infusing_kit.protocol.study import Protocol, Study, load_study

METHODS = ["toy-naive", "toy-l2sp", "toy-wise-ft"]
PROTOCOL = Protocol(search_seeds=(0, 1), final_seeds=(0,), heldout_seeds=(), heldout=(), second_search=(),
                    calibration_steps=20, trials=(("toy-l2sp", 8), ("toy-naive", 8)))


@pytest.fixture(scope="module")
def exported(smoke_study):
    return smoke_study.parents[1]  # the session's exported smoke world (conftest)


def _small_study_file(exported: Path) -> Path:
    """The exported study, cut to three methods, a one-field naive search and a short protocol."""
    text = (exported / "configs" / "study.toml").read_text()
    data = text[text.index("[model]"):text.index("[study]")]
    path = exported / "configs" / "small-study.toml"
    body = study_text("\n" + data, smoke=True, methods=METHODS, protocol=PROTOCOL)
    body = body.replace('[study.method.toy-naive]\npreset = "toy-naive"\nschedule = "smoke"',
                        '[study.method.toy-naive]\npreset = "toy-naive"\nschedule = "smoke"\n'
                        'search = [{field = "lr_backbone", low = 1e-05, high = 0.01, log = true}]')
    path.write_text(body)
    return path


@pytest.mark.slow
def test_the_exported_study_reproduces_the_built_in_comparison_exactly(exported, tmp_path):
    study = load_study(_small_study_file(exported))
    assert list(study.methods) == METHODS and study.protocol == PROTOCOL
    builtin = Study.builtin(True, METHODS[1:], protocol=PROTOCOL, searches={"toy-naive": LR_SPACE})
    builtin.methods = {m: p for m, p in builtin.methods.items() if m in METHODS}  # no toy-naive-long here
    a = C.compare(tmp_path / "builtin", study=builtin, log=lambda *_: None)
    logs = []
    b = C.compare(tmp_path / "file", study=study, log=logs.append)
    for m in METHODS:
        assert a[m]["params"] == b[m]["params"], m
        assert a[m].get("constraint_params") == b[m].get("constraint_params"), m
    assert "| toy-l2sp | 1 |" in logs[-1], logs[-1]  # the study's table lists its rows
    assert a["schedule"] == b["schedule"] and a["noise"] == b["noise"]
    ra, rb = (sorted(load_results(tmp_path / d / "results.jsonl"), key=lambda r: (label(r), r["seed"]))
              for d in ("builtin", "file"))
    assert [label(r) for r in ra] == [label(r) for r in rb]
    constraint = ["toy-l2sp [constraint rule]"] if a["toy-l2sp"]["constraint_params"] not in (None, a["toy-l2sp"]["params"]) else []
    assert [label(r) for r in ra] == ["toy-l2sp", *constraint, "toy-naive", "toy-wise-ft"]  # its own row when it chose
    #                                                                                        another strength
    for x, y in zip(ra, rb):
        assert x["pretrained"] == y["pretrained"] and x["finetuned"] == y["finetuned"] and x["val"] == y["val"], x["method"]
    trials = [json.loads(l) for l in (tmp_path / "file" / "trials.jsonl").read_text().splitlines()]
    assert {t["method"] for t in trials} == {"toy-naive", "toy-l2sp"} and all(t["smoke"] is False for t in trials)


@pytest.mark.parametrize("change, message", [
    (('baseline = "toy-naive"', 'baseline = "nope"'), "baseline 'nope' is not in methods"),
    (('methods = [', 'methods = ["toy-lora", '), "no \\[study.method.toy-lora\\] table"),
    (('constraint = 0.95', 'constraint = 1.5'), "constraint = 1.5 .* must be a fraction"),
    (('final_seeds = [0]', 'final_seeds = ["0"]'), "final_seeds"),
    (('[study.method.toy-l2sp]\npreset = "toy-l2sp"\nschedule = "smoke"',
      '[study.method.toy-l2sp]\npreset = "toy-l2sp"\nschedule = "smoke"\nl2_sp = 3.0'), r"unknown key\(s\) \['l2_sp'\]"),
    (('[study.method.toy-l2sp]\npreset = "toy-l2sp"', '[study.method.toy-l2sp]\npreset = "toy-l2sp"\n'
      'search = [{field = "l2sp", low = 10.0, high = 1.0}]'), "need low < high"),
])
def test_a_wrong_study_key_is_refused_naming_it(exported, change, message):
    text = _small_study_file(exported).read_text()
    assert change[0] in text, change[0]
    path = exported / "configs" / "broken-study.toml"
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ValueError, match=message):
        load_study(path)
