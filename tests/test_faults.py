"""The fault drill: kill -9 at random points (training through the library and the CLI, teacher extraction,
a search), then the same command again; and the bad inputs of docs/refusals.md.

Oracle for every kill: the same work done without interruption (weights bitwise equal, metrics equal).
The kill points are drawn at random (printed, so a failure can be replayed)."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from infusing_kit.datasets.data import Split
from infusing_kit.models import load_model, save_finetuned
from infusing_kit.train import TrainConfig, train
from conftest import HANG, cheap_validate, toy_generic, toy_target, toy_vlm

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "tests")}
RNG = random.Random(int(os.environ.get("FAULT_SEED", time.time_ns() % 10_000)))
CFG = TrainConfig(steps=12, batch_size=16, lr_backbone=1e-3, lr_head=1e-2, eval_every=3, ckpt_every=3, log_every=1,
                  select="score", l2sp=10.0)


def _python(code: str, timeout: int = HANG) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=timeout)


def test_library_training_killed_at_a_random_step_resumes_to_the_same_weights(tmp_path):
    k = RNG.randint(1, CFG.steps - 1)
    print(f"kill -9 at target step {k}")
    res = _python(f"""
        import os, signal
        from test_faults import CFG
        from conftest import cheap_validate, toy_target, toy_vlm
        from infusing_kit.train import train
        def die(state):
            if state.target_step == {k}:
                os.kill(os.getpid(), signal.SIGKILL)
        train(toy_vlm(), toy_target(), CFG, {str(tmp_path / 'run')!r}, validate=cheap_validate, hooks=(die,), progress=False)
    """)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    vlm = toy_vlm()
    head, _ = train(vlm, toy_target(), CFG, tmp_path / "run", validate=cheap_validate, resume=True, progress=False)
    ref = toy_vlm()
    ref_head, _ = train(ref, toy_target(), CFG, tmp_path / "ref", validate=cheap_validate, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(vlm.visual.state_dict().values(), ref.visual.state_dict().values()))
    assert torch.equal(head.weight, ref_head.weight)
    logs = [[json.loads(l) for l in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("run", "ref")]
    assert [h["step"] for h in logs[0]] == [h["step"] for h in logs[1]], "the resumed log has gaps or duplicates"


@pytest.mark.slow
def test_cli_run_killed_before_or_after_its_first_checkpoint_resumes_to_the_same_metrics(tmp_path, smoke_reference):
    ref = json.loads((smoke_reference / "metrics.json").read_text())
    cmd = [sys.executable, "-m", "infusing_kit", "experiment", "--preset", "toy-naive", "--smoke", "--out"]
    for when, k in (("before", RNG.randint(1, 40)), ("after", RNG.randint(55, 140))):
        out = tmp_path / when
        print(f"kill -9 {when} the first checkpoint, at target step >= {k}")
        proc = subprocess.Popen(cmd + [str(out)], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        log = out / "run" / "log.jsonl"
        while proc.poll() is None:
            steps = [json.loads(l).get("target_step", 0) for l in log.read_text().splitlines()] if log.exists() else []
            if steps and max(steps) >= k:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
        again = subprocess.run(cmd + [str(out)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=HANG)
        assert again.returncode == 2 and "--resume" in again.stderr, again.stderr[-1000:]
        done = subprocess.run(cmd + [str(out), "--resume"], env=ENV, cwd=ROOT, capture_output=True, text=True,
                              timeout=HANG)
        assert done.returncode == 0, done.stderr[-2000:]
        m = json.loads((out / "metrics.json").read_text())
        assert m["finetuned"] == ref["finetuned"] and m["best_step"] == ref["best_step"], when


def test_teacher_extraction_killed_part_way_continues_where_it_stopped(tmp_path):
    res = _python(f"""
        import os, signal, torch
        from infusing_kit import models
        from infusing_kit.methods import teacher
        from conftest import toy_generic
        vlm = models.load_model("toy-clip-tiny", None)
        calls = []
        real = teacher.embed_images
        def embed(*a, **kw):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)
        teacher.embed_images = embed
        torch.manual_seed(0)
        teacher.extract_teacher(models.load_model("toy-clip-tiny", None), toy_generic(), path={str(tmp_path / 't.npy')!r},
                                chunk=10, progress=False)
    """)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert json.loads((tmp_path / "t.npy.json").read_text())["done"] == 20
    from infusing_kit.methods.teacher import extract_teacher
    torch.manual_seed(0)
    vlm = load_model("toy-clip-tiny", None)
    resumed = extract_teacher(vlm, toy_generic(), path=tmp_path / "t.npy", chunk=10, progress=False)
    whole = extract_teacher(vlm, toy_generic(), path=tmp_path / "whole.npy", chunk=10, progress=False)
    assert torch.equal(resumed.embeddings, whole.embeddings) and resumed.fingerprint == whole.fingerprint
    in_memory = extract_teacher(vlm, toy_generic(), progress=False)  # other batch sizes: equal up to float rounding
    torch.testing.assert_close(resumed.embeddings, in_memory.embeddings, atol=1e-5, rtol=0)
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="another model or other data"):
        extract_teacher(load_model("toy-clip-tiny", None), toy_generic(), path=tmp_path / "t.npy", progress=False)


def test_a_search_killed_mid_trial_resumes_to_the_same_study(tmp_path):
    k = RNG.randint(2, 10)
    print(f"kill -9 during trial {k}")
    script = f"""
        import os, signal, math, sys
        from infusing_kit.protocol import search as S
        from infusing_kit.protocol.runners import Builtin
        calls = []
        class Fake(Builtin):
            def run(self, preset, out, seed=0, overrides=None, **_):
                return run(overrides)
        def run(overrides):
            calls.append(1)
            if KILL and len(calls) == {k} + 1:
                os.kill(os.getpid(), signal.SIGKILL)
            x = overrides["l2sp"]
            v = 1 / (1 + abs(math.log10(x) - 2))
            return {{"val": {{"mean_map@20": v, "fine_map@20": v, "generic_map@20": v}}, "train": overrides,
                    "updates": {{}}, "best_step": 1}}
        KILL = sys.argv[2] == "kill"
        S.search("toy-l2sp", sys.argv[1], "{tmp_path}/runs", trials=12, base={{"steps": 100}}, extend=False,
                 runner=Fake())
    """
    (tmp_path / "drill.py").write_text(textwrap.dedent(script))
    run = lambda db, mode: subprocess.run([sys.executable, str(tmp_path / "drill.py"), str(tmp_path / db), mode],
                                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert run("killed.db", "kill").returncode == -signal.SIGKILL
    assert run("killed.db", "resume").returncode == 0
    assert run("whole.db", "resume").returncode == 0
    from infusing_kit.protocol.search import trial_rows
    a, b = (sorted(round(r["params"]["l2sp"], 9) for r in trial_rows(tmp_path / db)) for db in ("killed.db", "whole.db"))
    assert len(a) == 12 and a == b


# ---------------------------------------------------------------------------- bad inputs
def test_resuming_with_another_model_data_or_class_count_is_a_clear_error(tmp_path):
    cfg = replace(CFG, l2sp=0.0)
    train(toy_vlm(), toy_target(), cfg, tmp_path / "r", validate=cheap_validate, hooks=(lambda s: s.target_step < 3,),
          progress=False)
    cases = {"another model": (load_model("toy-clip", None), toy_target()),
             "another number of target classes": (toy_vlm(), toy_target(n_classes=5)),
             "other target data": (toy_vlm(), toy_target(seed=9))}
    for message, (vlm, data) in cases.items():
        with pytest.raises(ValueError, match=message):
            train(vlm, data, cfg, tmp_path / "r", validate=cheap_validate, resume=True, progress=False)


def test_a_target_with_one_class_is_refused():
    one = Split(torch.zeros(6, 3, 32, 32, dtype=torch.uint8), np.zeros(6))
    with pytest.raises(ValueError, match="has 1 class"):
        train(toy_vlm(), one, CFG, progress=False)


def test_unwritable_out_and_registry_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    t0 = time.time()
    for args in (["--out", str(tmp_path / "file" / "run")],
                 ["--out", str(tmp_path / "ok"), "--registry", str(tmp_path / "file" / "r.jsonl")]):
        res = subprocess.run([sys.executable, "-m", "infusing_kit", "experiment", "--preset", "toy-naive", "--smoke",
                              *args], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=HANG)
        assert res.returncode == 2 and "not writable" in res.stderr, res.stderr[-1000:]
    assert time.time() - t0 < 120, "refused only after the setup work"


def test_last_checkpoint_holds_no_copy_of_the_pretrained_weights(tmp_path):
    vlm = toy_vlm()
    train(vlm, toy_target(), CFG, tmp_path / "r", validate=cheap_validate, progress=False)
    ckpt = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert "theta0" not in ckpt and set(ckpt["identity"]) >= {"model", "weights", "target", "config"}
    tower = sum(v.numel() * v.element_size() for v in vlm.visual.state_dict().values())
    assert (tmp_path / "r" / "last.pt").stat().st_size < 3.3 * tower  # weights + AdamW's two moments, no more


def test_the_kit_loads_its_own_fine_tuned_model(tmp_path):
    vlm = toy_vlm()
    head, _ = train(vlm, toy_target(), replace(CFG, eval_every=0), progress=False)
    save_finetuned(vlm, tmp_path / "model.pt", head)
    back = load_model("toy-clip-tiny", str(tmp_path / "model.pt"))
    assert all(torch.equal(a, b) for a, b in zip(vlm.model.state_dict().values(), back.model.state_dict().values()))
    with pytest.raises(ValueError, match="holds a fine-tuned 'toy-clip-tiny'"):
        load_model("toy-clip", str(tmp_path / "model.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("toy-clip-tiny", str(tmp_path / "missing.pt"))
