"""A config or study file's resolved settings, checked by the kit's own loaders, without opening any data.

  python -m infusing_kit check --config FILE.toml [--data]

`config.load_config` and `study.load_study` check every key, type and range (and build every method's
`TrainConfig`); they also require every file the config names to exist. `resolve_file(path)` runs those same
loaders with that one check left out (paths are resolved against `[data] root` but not looked at), so a config
can be checked, and its settings read, on a machine without the data (CI, a laptop; tests/test_paper.py does it
for configs/paper/). With data=True (`--data`) every named file must exist, as a run requires.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path
from unittest import mock


@contextlib.contextmanager
def _paths_not_required():
    """config.load_config without its existence check of the files a config names (keys are still checked)."""
    from . import config
    with mock.patch.object(config, "_exists", lambda p, where: p):
        yield


def global_steps(cfg) -> int | None:
    """Optimiser steps of a run (target plus generic batches) where the sampler fixes them: target_only: `steps`;
    round_robin: 2 x steps - 1 (target first, the last step a target batch; as the official round robin over
    target and generic). The other samplers draw at random or adapt to the losses: None."""
    if cfg.sampler == "target_only":
        return cfg.steps
    if cfg.sampler == "round_robin":
        return 2 * cfg.steps - 1
    return None


def _train(cfg) -> dict:
    steps = global_steps(cfg)
    return {"train": asdict(cfg), "schedule": {
        "target_steps": cfg.steps, "global_steps": steps,
        "generic_steps": None if steps is None else steps - cfg.steps,
        "training_images": None if steps is None else steps * cfg.batch_size,
        "validations": cfg.steps // cfg.eval_every + (cfg.steps % cfg.eval_every > 0) + 1 if cfg.eval_every else 0}}


def resolve_file(path: str | Path, data: bool = False) -> dict:
    """The settings of an experiment config or a study file (a [study] table), as the kit will run them: model,
    data parts (paths resolved), and each method's TrainConfig with its schedule in steps and images; a study's
    protocol and search spaces too. data=False: the named files need not exist."""
    from .config import load_config, post_hoc_of, read_toml, train_config
    path = Path(path).resolve()
    kind = "study" if "study" in read_toml(path) else "experiment"
    with contextlib.nullcontext() if data else _paths_not_required():
        if kind == "experiment":
            cfg = load_config(path)
            return {"file": str(path), "kind": kind, "name": cfg["name"], "seed": int(cfg.get("seed", 0)),
                    "model": cfg["model"], "data": cfg["data"], "post_hoc": post_hoc_of(cfg["method"]),
                    "method": cfg["method"], **_train(train_config(cfg, str(path)))}
        from . import study as S
        st = S._load_study.__wrapped__(str(path), path.stat().st_mtime_ns)  # uncached: a Study without data checks
    return {"file": str(path), "kind": kind, "name": st.name, "model": st.config["model"], "data": st.config["data"],
            "protocol": asdict(st.protocol),
            "methods": {name: {"post_hoc": m.post_hoc, "ablation_of": m.ablation_of,
                               "search": [dict(zip(("field", "low", "high", "log"), s)) for s in m.search],
                               "table": st.tables[name], **_train(m.train)} for name, m in st.methods.items()}}
