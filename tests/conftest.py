"""Shared fixtures: a headless Chromium driven by Playwright (for the course site and the explorer page), the small
worlds and models tests train on, and `FakeRunner` (a study runner whose runs are a function)."""
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from infusing_kit.protocol.runners import Builtin


@dataclass(frozen=True, eq=False)
class FakeRunner(Builtin):
    """The built-in runner with its runs replaced by `fake(method, out_dir, seed=, overrides=, test=, hooks=, ...)`
    (what `Runner.run` receives, and smoke): searches, comparisons and the CLI are handed it instead of a module
    being patched. Everything else (its presets, study names, seed keys, describe()) is the built-in runner's.
    calls: each run asked for."""
    fake: Callable = None
    calls: list = field(default_factory=list)

    def run(self, method, out_dir, seed=0, overrides=None, test=True, hooks=(), **kw):
        overrides = dict(overrides or {})
        self.calls.append({"preset": method, "seed": seed, "overrides": overrides, "test": test, "out": str(out_dir),
                           "tags": kw.get("tags") or {},
                           **{k: kw.get(k) for k in ("reuse", "merge_with")}})
        return self.fake(method, out_dir, seed=seed, overrides=overrides, test=test, hooks=hooks, smoke=self.smoke,
                         **kw)

HANG = 5400  # seconds: subprocess hang guards sit at CI's own limit; a slow, loaded machine fails no test

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "build" / "test-artifacts"   # screenshots the browser tests keep
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="session")
def browser():
    """A Playwright Browser on Debian's chromium (Playwright's own browser download is not available here)."""
    exe = chromium_path()
    if exe is None:
        pytest.skip("chromium is not installed (.ci/run installs it with apt-get; or `apt-get install chromium`)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS, headless=True)  # a fresh temporary profile
        yield b
        b.close()


@pytest.fixture(scope="session")
def smoke_reference(tmp_path_factory):
    """`experiment --preset toy-naive --smoke` run once through the CLI, uninterrupted (with a registry): the
    oracle of the kill -9 drill and the CLI's own checks."""
    import os
    import subprocess
    import sys
    out = tmp_path_factory.mktemp("smoke-reference") / "run"
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "infusing_kit", "experiment", "--preset", "toy-naive", "--smoke",
                          "--out", str(out), "--registry", str(out.parent / "results.jsonl")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=HANG)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def tiny_world_and_model():
    """A 4-class fine-grained world with a few generic images and an untrained toy-clip-tiny (seeded): enough for
    validation functions and weight-space merges, in well under a second."""
    import torch

    from infusing_kit import world as W
    from infusing_kit.models import load_model
    world = W.make_world(W.WorldConfig(seed=3, generic_train=50, generic_val_combos=10, generic_test_combos=10,
                                       text_pairs=10, fine_train_classes=6, fine_val_classes=4, fine_test_classes=4,
                                       fine_per_class=4))
    torch.manual_seed(0)
    return world, load_model("toy-clip-tiny", pretrained=None)


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """The built-in world exported at smoke size (export-world --smoke) and its study file with toy-l2sp trials of a
    few seconds (20 target steps): configs/quick-study.toml."""
    from infusing_kit.protocol.export import export_world
    out = tmp_path_factory.mktemp("exported") / "w"
    export_world(out, smoke=True, progress=False)
    text = (out / "configs" / "study.toml").read_text()
    old = '[study.method.toy-l2sp]\npreset = "toy-l2sp"\nschedule = "smoke"'
    assert old in text
    path = out / "configs" / "quick-study.toml"
    path.write_text(text.replace(old, old + "\nsteps = 20\neval_every = 10"))
    return path


# ---------------------------------------------------------------------------- small data and models for the tests
def toy_target(n_classes=8, per_class=6, seed=0):
    """A learnable target split: one random image per class plus noise, non-contiguous labels (train() remaps)."""
    import numpy as np
    import torch
    from infusing_kit.datasets.data import Split
    g = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(n_classes) * 7, per_class)
    base = torch.randint(0, 256, (n_classes, 3, 32, 32), generator=g)
    noise = torch.randint(-20, 21, (len(labels), 3, 32, 32), generator=g)
    return Split((base[labels // 7] + noise).clamp(0, 255).to(torch.uint8), labels)


def toy_generic():
    """47 random generic images in 5 classes."""
    import numpy as np
    import torch
    from infusing_kit.datasets.data import Split
    g = torch.Generator().manual_seed(5)
    return Split(torch.randint(0, 256, (47, 3, 32, 32), generator=g, dtype=torch.uint8), np.arange(47) % 5)


def toy_vlm(seed=0):
    """An untrained toy-clip-tiny, seeded."""
    import torch
    from infusing_kit.models import load_model
    torch.manual_seed(seed)
    return load_model("toy-clip-tiny", pretrained=None)


def cheap_validate(vlm):
    """A cheap, deterministic score of the current weights (selection without evaluation)."""
    return {"score": float(sum(p.double().sum() for p in vlm.visual.parameters()).item() % 1.0)}


def _tiny_train():
    from infusing_kit.train import TrainConfig
    return TrainConfig(steps=6, batch_size=16, lr_backbone=1e-3, lr_head=1e-2, eval_every=3, ckpt_every=3, log_every=1,
                       select="score")


TINY_TRAIN = _tiny_train()  # a few steps with checkpoints and validations (selection on cheap_validate)


@pytest.fixture
def world(smoke_study, tmp_path):
    """A private copy of the exported smoke world's split files and configs (images and model shared, read only)."""
    src, dst = smoke_study.parents[1], tmp_path / "w"
    dst.mkdir()
    for name in ("images", "model"):
        (dst / name).symlink_to(src / name)
    for name in ("target", "generic", "text", "configs"):
        shutil.copytree(src / name, dst / name)
    return dst
