"""Data parallel through torchrun (gloo, 2 CPU processes): the same weights as one process with the same global
batch, with the paper's combination (L2-SP's analytic gradient after the all-reduce, distillation to pre-extracted
teacher rows, round robin), a kept checkpoint chosen on gathered validation embeddings, and rank 0 writing alone.

Tolerance: every tensor within 1e-6 of the one-process run (float summation order), except the key third of each
attention's fused in_proj bias, within 1e-3: its true gradient is zero (softmax ignores a constant added to every
key), so its float noise differs between the runs and Adam, which divides by the gradient's own magnitude, turns
it into updates of up to lr."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import HANG

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import sys, torch, numpy as np
    torch.set_num_threads(1)
    from infusing_kit import distributed
    from infusing_kit.datasets.data import Split
    from infusing_kit.protocol.experiment import validation_fn, Domains
    from infusing_kit.models import load_model
    from infusing_kit.methods.teacher import extract_teacher
    from infusing_kit.train import TrainConfig, train
    distributed.init_from_env("cpu")
    g = torch.Generator().manual_seed(0)
    tgt = Split(torch.randint(0, 256, (48, 3, 32, 32), generator=g, dtype=torch.uint8), np.repeat(np.arange(6), 8))
    gen = Split(torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8), np.arange(40) % 8)
    val = Split(torch.randint(0, 256, (20, 3, 32, 32), generator=g, dtype=torch.uint8), np.arange(20) % 4)
    torch.manual_seed(0)
    vlm = load_model("toy-clip-tiny", None)
    d = Domains(tgt, val, val, gen, val, val, val)
    cfg = TrainConfig(steps=6, batch_size=16, lr_backbone=1e-3, lr_head=1e-2, sampler="round_robin", distill=5.0,
                      l2sp=20.0, eval_every=2, ckpt_every=2, log_every=1, select="mean_map@20")
    head, res = train(vlm, tgt, cfg, out_dir=sys.argv[1], generic=gen, teacher=extract_teacher(vlm, gen, progress=False),
                      validate=validation_fn(d), progress=False)
    if distributed.is_main():
        torch.save({"visual": vlm.visual.state_dict(), "head": head.state_dict(), "best": res.best_step}, sys.argv[1] + "/final.pt")
''')


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one(tmp_path):
    (tmp_path / "ddp.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    one = subprocess.run([sys.executable, str(tmp_path / "ddp.py"), str(tmp_path / "one")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=HANG)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29533", str(tmp_path / "ddp.py"),
                          str(tmp_path / "two")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (torch.load(tmp_path / d / "final.pt", weights_only=True) for d in ("one", "two"))
    assert a["best"] == b["best"]
    for k, x in a["visual"].items():
        y = b["visual"][k]
        if k.endswith("in_proj_bias"):
            third = len(x) // 3
            torch.testing.assert_close(y[third:2 * third], x[third:2 * third], atol=1e-3, rtol=0)
            x, y = torch.cat([x[:third], x[2 * third:]]), torch.cat([y[:third], y[2 * third:]])
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0, msg=k)
    torch.testing.assert_close(b["head"]["weight"], a["head"]["weight"], atol=1e-6, rtol=0)
    logs = [(tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("one", "two")]
    assert len(logs[0]) == len(logs[1]), "rank 0 alone writes the log, one line per record"


@pytest.mark.slow
def test_a_data_parallel_search_trains_each_trial_with_rank_0s_parameters_on_every_rank(tmp_path, smoke_study):
    """Under torchrun rank 0 asks the study for each trial and broadcasts its parameters; every rank writes what it
    trained (TRIAL/params-rankR.json)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    res = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29534", "-m", "infusing_kit",
                          "search", "--config", str(smoke_study), "--method", "toy-l2sp", "--trials", "6",
                          "--storage", str(tmp_path / "s.db"), "--out", str(tmp_path / "runs")],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=HANG)
    assert res.returncode == 0, res.stderr[-3000:]
    trials = sorted((tmp_path / "runs" / "quick-study-toy-l2sp-seed0").glob("trial*"))
    assert len(trials) >= 6
    import json
    for t in trials:
        a, b = (json.loads((t / f"params-rank{r}.json").read_text()) for r in (0, 1))
        assert a == b and set(a) == {"l2sp"}, t
    values = [json.loads((t / "params-rank0.json").read_text())["l2sp"] for t in trials]
    assert len(set(values)) == len(values), "every trial trains its own point"


@pytest.mark.slow
def test_metrics_json_is_a_fresh_evaluation_of_model_pt_with_one_and_two_processes(tmp_path, smoke_study):
    """What a run reports is what its model.pt scores: the run's test metrics equal a fresh evaluation of the saved
    weights, run in one process and under torchrun with two (rank 0 evaluates and writes)."""
    import json
    from infusing_kit.protocol.config import setup_from_config
    from infusing_kit.protocol.experiment import evaluate
    from infusing_kit.models import load_model
    text = (smoke_study.parent / "toy-naive.toml").read_text()
    assert 'schedule = "smoke"' in text
    path = smoke_study.parent / "ddp-naive.toml"
    path.write_text(text.replace('schedule = "smoke"', 'schedule = "smoke"\nsteps = 6\neval_every = 3', 1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = ["-m", "infusing_kit", "experiment", "--config", str(path), "--out"]
    for name, launcher in (("one", [sys.executable]), ("two", [torchrun, "--nproc_per_node", "2", "--master_port",
                                                               "29535"])):
        res = subprocess.run(launcher + cmd + [str(tmp_path / name)], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=HANG)
        assert res.returncode == 0, res.stderr[-3000:]
    setup = setup_from_config(path, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs evaluated (OMP_NUM_THREADS=1)
    try:
        for name in ("one", "two"):
            m = json.loads((tmp_path / name / "metrics.json").read_text())
            vlm = load_model("toy-clip", str(tmp_path / name / "model.pt"))
            assert evaluate(vlm, setup.domains) == m["finetuned"], name
    finally:
        torch.set_num_threads(threads)
