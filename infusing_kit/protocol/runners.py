"""Where a study's runs come from: one setup factory per source of model and data.

A runner turns a method's name, a seed and TrainConfig overrides into an `experiment.Setup` (`setup`): the one
factory that the kit's presets and a study file's methods share. `run` trains that setup with
`experiment.run_merged`, which first trains the other runs a merge of several runs takes (the setup carries
which: `Setup.ingredients`) unless they are given. Searches, comparisons and chapters receive a runner and never
ask which kind it is; a test hands them its own runner (a subclass whose `run` is a fake) instead of patching a
module.

  Builtin(smoke, world, searches)   the kit's presets on a built-in world (`experiment.toy_setup`)
  StudyFile(path)                   the methods of a study file, on its model and data (`config.setup_from_config`)

Runners are frozen dataclasses, so spawned search workers and parallel runs receive them (pickled). `describe()`
is what a study's storage and chosen.json record of the runner (the same five keys for both kinds, as always).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path


class Runner:
    """What every runner gives; `method`, `setup`, `describe`, `study_name`, `seed_key`, `model_name` and
    `model_and_data` are each kind's own."""
    smoke: bool = False

    def method(self, name: str):
        """The method's Preset (its TrainConfig, search space and post hoc)."""
        raise NotImplementedError

    def setup(self, name: str, seed: int = 0, overrides: dict | None = None, device: str = "cpu",
              progress: bool = False):
        """The experiment one run of `name` makes (model loaded lazily), its TrainConfig changed by `overrides`."""
        raise NotImplementedError

    def train_config(self, name: str):
        m = self.method(name)
        return m.smoke_train if self.smoke else m.train

    def run(self, method: str, out_dir, seed: int = 0, overrides: dict | None = None, test: bool = True,
            registry=None, hooks: tuple = (), resume: bool = False, tags: dict | None = None, reuse=None,
            merge_with=None, device: str = "cpu", progress: bool = False, keep_weights: bool = True) -> dict:
        """One run of `method` into out_dir (`experiment.run_merged`). merge_with: the model.pt files a merge of
        several runs merges (None: it trains them first, in out_dir/ingredients/). tags: labels echoed into
        metrics.json and the registry row."""
        from .experiment import run_merged
        setup = self.setup(method, seed, overrides, device, progress)
        setup.source["tags"] = dict(tags or {})
        return run_merged(setup, out_dir, device, progress, test, registry, hooks, resume, reuse, merge_with,
                          keep_weights)


@dataclass(frozen=True)
class Builtin(Runner):
    """The kit's presets on a built-in world. searches: ((preset, search space), ...) replacing a preset's own."""
    smoke: bool = False
    world: str = "near"
    searches: tuple = ()

    def method(self, name: str):
        from .presets import PRESETS
        own = dict(self.searches)
        return replace(PRESETS[name], search=tuple(own[name])) if name in own else PRESETS[name]

    def setup(self, name: str, seed: int = 0, overrides: dict | None = None, device: str = "cpu",
              progress: bool = False):
        from .experiment import toy_setup
        return toy_setup(name, seed, self.smoke, device, overrides, progress=progress, world=self.world)

    def describe(self) -> dict:
        return {"kind": "builtin", "smoke": self.smoke, "world": self.world, "path": None,
                "searches": asdict(self)["searches"]}

    def study_name(self, method: str, seed: int) -> str:
        """The study's name in its storage; what it is lives in its user attributes ("method", "seed", "runner")."""
        return f"{method}{'-smoke' if self.smoke else ''}-seed{seed}"

    def seed_key(self, method: str, seed: int) -> str:
        """What a study's sampler seed is drawn from: the method, the seed and whether it runs the smoke schedule
        (not the storage name), so a study file of the built-in world draws exactly the points the built-in
        comparison draws. Here the storage name says exactly that."""
        return self.study_name(method, seed)

    def model_name(self) -> str:
        from .experiment import pretrain_config
        return pretrain_config(0).model

    def model_and_data(self) -> dict:
        """{"model": ..., "data": {part: ...}}: digests of the world's and the pretraining's configs."""
        from .experiment import pretrain_config, world_config
        key = lambda c: hashlib.sha256(json.dumps(asdict(c), sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"model": key(pretrain_config(0, self.smoke, self.world)),
                "data": {"world": key(world_config(0, self.smoke, self.world))}}


@dataclass(frozen=True, eq=False)
class StudyFile(Runner):
    """The methods of a study file (study.py, `load_study`, which makes this runner) on its [model] and [data]. A
    method with schedule = "smoke" runs the smoke schedule; the runner itself never does. It holds what the file
    said when it was checked (config: the [model] and [data] tables; tables: each method's table as written;
    methods: each method's Preset), so every process a study spawns runs exactly that."""
    path: str
    config: dict
    tables: dict
    methods: dict

    def method(self, name: str):
        return self.methods[name]

    def setup(self, name: str, seed: int = 0, overrides: dict | None = None, device: str = "cpu",
              progress: bool = False):
        from .config import setup_from_config
        from .experiment import check_overrides
        setup = setup_from_config(dict(self.config, seed=seed), device=device, progress=progress,
                                  method=self.tables[name], name=name)
        setup.train = replace(setup.train, **check_overrides(overrides))
        setup.overrides = dict(overrides or {})
        return setup

    def describe(self) -> dict:
        return {"kind": "config", "smoke": False, "world": "near", "path": self.path, "searches": ()}

    def study_name(self, method: str, seed: int) -> str:
        """Unique per study file, method and seed (the storage may hold several files' studies)."""
        return f"{Path(self.path).stem}:{method}-seed{seed}"

    def seed_key(self, method: str, seed: int) -> str:
        smoke = self.tables[method].get("schedule") == "smoke"
        return f"{method}{'-smoke' if smoke else ''}-seed{seed}"

    def model_name(self) -> str:
        return self.config["model"]["name"]

    def model_and_data(self) -> dict:
        """{"model": ..., "data": {part: ...}}: digests of the file's [model] and of each [data] table (a file it
        names by its content)."""
        from .fingerprint import _table
        cfg = self.config
        d = cfg["data"]
        data = {f"[data.{g}] {part}": _table(v) for g in ("target", "generic", "text") for part, v in d[g].items()
                if isinstance(v, dict)}
        data["[data.generic] prompts"] = _table({k: v for k, v in d["generic"].items() if not isinstance(v, dict)})
        data["[data]"] = _table({k: v for k, v in d.items() if not isinstance(v, dict)})
        return {"model": _table(cfg["model"]), "data": data}
