"""A study: the paper's protocol (searches on validation, a converged baseline, final runs on several seeds) for a
set of methods on one model and its data, from the built-in world or from one TOML file.

  python -m infusing_kit compare --config study.toml --out DIR [--jobs 2] [--storage postgresql://...]
  python -m infusing_kit search --config study.toml --method paper --storage DB

A study file has the [model] and [data] tables of an experiment config (config.py) and a [study] table:

  [study]
  baseline = "naive"                  # the method whose search sets the learning rates and the schedule
  methods = ["naive", "paper"]        # the table's rows, each defined below
  search_seeds = [0, 1, 2, 3, 4]      # seed 0 searches; all calibrate the schedule and the noise
  final_seeds = [0, 1, 2, 3, 4]       # test runs of every method
  heldout_seeds = [5, 6, 7]           # test runs no choice saw, of the methods in `heldout`
  heldout = ["naive", "paper"]
  second_search = []                  # methods searched again on seed 1 (do the choices survive?)
  calibration_steps = 600             # target steps of the baseline's learning-rate search
  constraint = 0.95                   # the constraint rule: fine-grained validation >= 0.95 x the baseline's
  constraint_seeds = 3                # its choice, where it differs from the mean rule's, on the first 3 final seeds
  trials = {paper = 24}               # a study's whole budget of finished trials (default 12 for one searched
                                      # field, 20 for two; edge extensions and transition points included)
  core = ["naive", "paper"]           # optional: searched and run first, on every final seed; the others after,
  other_final_seeds = [0, 1, 2]       # on these

  [study.method.naive]
  preset = "toy-naive"                # optional: a kit preset as the base (its TrainConfig, search, post hoc)
  search = [{field = "lr_backbone", low = 1e-5, high = 1e-2, log = true},
            {field = "lr_head", low = 1e-4, high = 1e-1, log = true}]
  [study.method.paper]
  preset = "toy-paper"
  l2sp = 1e5                          # any TrainConfig field: fixed (a searched field starts from it)
  search = [{field = "l2sp", low = 0.1, high = 1e6, log = true}]

Every key is checked and echoed into chosen.json. `Study.builtin(smoke)` is the kit's own comparison on the
built-in world, the same stages with the presets as methods; `export-world` writes it as a study file.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .presets import PRESETS, Preset
from .runners import Builtin, Runner, StudyFile  # noqa: F401 (study.Runner)

PROTOCOL_KEYS = ("baseline", "methods", "search_seeds", "final_seeds", "heldout_seeds", "heldout", "second_search",
                 "calibration_steps", "constraint", "trials", "soup_ingredients", "stock_seed", "core",
                 "other_final_seeds", "constraint_seeds", "method")
# The built-in comparison's core table (searched and run first; every final seed): the baseline and its longer
# schedule, the paper's combination and its l2sp = 0 ablation, distillation (and with its learning rate searched),
# L2-SP, EWC, LP-FT, and the post-hoc merges WiSE-FT, the uniform soup and Model Stock.
CORE = ("toy-naive", "toy-naive-long", "toy-paper", "toy-paper-no-l2sp", "toy-distill", "toy-distill-lr", "toy-l2sp",
        "toy-ewc", "toy-lp-ft", "toy-wise-ft", "toy-soup-uniform", "toy-model-stock")
SPACE_KEYS = {"field", "low", "high", "log"}


@dataclass(frozen=True)
class Protocol:
    baseline: str = "toy-naive"
    search_seeds: tuple = (0, 1, 2, 3, 4)   # 0 searches; all calibrate the schedule and the seed noise
    final_seeds: tuple = (0, 1, 2, 3, 4)
    heldout_seeds: tuple = (5, 6, 7)
    heldout: tuple = ("toy-naive", "toy-paper", "toy-distill", "toy-l2sp", "toy-ewc")
    second_search: tuple = ("toy-paper", "toy-distill")
    calibration_steps: int = 600
    constraint: float = 0.95
    trials: tuple = ()                 # ((method, finished trials), ...)
    soup_ingredients: int = 3
    stock_seed: int = 1000
    core: tuple | None = None          # methods searched and run first, on every final seed (None: every method)
    other_final_seeds: tuple = (0, 1, 2)   # the final seeds of the methods outside `core`
    constraint_seeds: int = 3          # the constraint rule's choice (where it differs) runs on the first N final seeds

    def check(self, where: str = "the protocol") -> "Protocol":
        """Refuse a protocol the stages cannot run (an empty or repeated seed list, ...), naming the field."""
        for key in ("search_seeds", "final_seeds"):
            if not getattr(self, key):
                raise ValueError(f"{where} {key} = []: give at least one seed (e.g. {key} = [0]); the first "
                                 f"{'searches' if key == 'search_seeds' else 'is the first final run'}")
        for key in ("search_seeds", "final_seeds", "heldout_seeds", "other_final_seeds"):
            seeds = list(getattr(self, key))
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"{where} {key} = {seeds} repeats a seed; list each seed once")
        return self

    def trials_of(self, method: str) -> int | None:
        return dict(self.trials).get(method)

    def seeds_of(self, method: str) -> tuple:
        """The final seeds of a method: every final seed in the core table, `other_final_seeds` outside it."""
        return self.final_seeds if self.core is None or method in self.core else \
            tuple(s for s in self.other_final_seeds if s in self.final_seeds) or self.final_seeds


@dataclass
class Study:
    name: str
    runner: Runner
    methods: dict[str, Preset]
    protocol: Protocol
    config: dict = field(default_factory=dict)     # the study file's parsed [model]/[data] (a study file)
    tables: dict = field(default_factory=dict)     # each method's table as written (a study file)

    @classmethod
    def builtin(cls, smoke: bool = False, presets: list[str] | None = None, world: str = "near",
                protocol: Protocol | None = None, searches: dict | None = None,
                runner: Runner | None = None) -> "Study":
        """The kit's comparison on the built-in world: toy-naive, toy-naive-long and `presets` (default: all).
        searches: {preset: search space} to explore instead of a preset's own. runner: how its runs are made
        (default `runners.Builtin(smoke, world, searches)`; a test gives its own)."""
        names = ["toy-naive", "toy-naive-long"] + [p for p in (presets if presets is not None else PRESETS)
                                                   if p not in ("toy-naive", "toy-naive-long")]
        unknown = sorted(set(names) - set(PRESETS))
        if unknown:
            raise ValueError(f"unknown presets {unknown}; choose from {sorted(PRESETS)}")
        if protocol is None:  # smoke: the baseline's search at its own short schedule
            protocol = Protocol(calibration_steps=PRESETS["toy-naive"].smoke_train.steps, core=CORE) if smoke else \
                Protocol(core=CORE)
        runner = runner or Builtin(smoke, world, tuple(sorted((searches or {}).items())))
        return cls(f"builtin-{world}{'-smoke' if smoke else ''}", runner, {n: runner.method(n) for n in names},
                   protocol)

    def describe(self) -> dict:
        p = asdict(self.protocol)
        return {"name": self.name, "runner": self.runner.describe(), "methods": list(self.methods), "protocol": p}


def load_study(path: str | Path) -> Study:
    """Parse and check a study file (module docstring); every key is checked, nothing is trained yet."""
    return _load_study(str(Path(path).resolve()), Path(path).stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_study(path: str, mtime: int) -> Study:
    from .config import check_method, load_config, train_config
    from .formats import check_table, check_value
    cfg = load_config(path, kind="study")
    st = cfg["study"]
    seeds = (list, lambda v: all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v),
             "a list of integers >= 0")
    names = (list, lambda v: all(isinstance(s, str) for s in v), "a list of method names")
    check_table(st, {"baseline": (str, None, "a method name"), "methods": names, "search_seeds": seeds,
                     "final_seeds": seeds, "heldout_seeds": seeds, "heldout": names, "second_search": names,
                     "calibration_steps": (int, lambda v: v >= 1, "an integer >= 1"),
                     "constraint": (float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
                     "trials": (dict, None, "a table method = trials"),
                     "soup_ingredients": (int, lambda v: v >= 1, "an integer >= 1"),
                     "stock_seed": (int, lambda v: v >= 1, "an integer >= 1"), "method": (dict, None, "tables"),
                     "core": names, "other_final_seeds": seeds,
                     "constraint_seeds": (int, lambda v: v >= 1, "an integer >= 1")},
                f"{path} [study]", required={"baseline", "methods", "method"})
    where = f"{path} [study]"
    tables = st["method"]
    if not st["methods"] or len(set(st["methods"])) != len(st["methods"]):
        raise ValueError(f"{where} methods = {st['methods']}: list each method once, at least one")
    for name in list(st["methods"]) + [n for n in tables if n not in st["methods"]]:
        check_method_name(name, where)
    for name in st["methods"]:
        if name not in tables:
            raise ValueError(f"{where} methods names {name!r}, which has no [study.method.{name}] table")
    for key in ("heldout", "second_search", "core"):
        bad = [m for m in st.get(key, []) if m not in st["methods"]]
        if bad:
            raise ValueError(f"{where} {key} names {bad}, which are not in methods {st['methods']}")
    if st["baseline"] not in st["methods"]:
        raise ValueError(f"{where} baseline {st['baseline']!r} is not in methods {st['methods']}")
    for m, n in st.get("trials", {}).items():
        if m not in st["methods"]:
            raise ValueError(f"{where} trials names {m!r}, which is not in methods")
        check_value(n, (int, lambda v: v >= 1, "an integer >= 1"), f"{where} trials {m}")
    methods, written = {}, {}
    for name in st["methods"]:
        t = dict(tables[name])
        w = f"{path} [study.method.{name}]"
        search = t.pop("search", None)
        ablation_of = t.pop("ablation_of", None)
        if ablation_of is not None and (ablation_of not in st["methods"] or ablation_of == name):
            raise ValueError(f"{w} ablation_of {ablation_of!r} must name another method of the study")
        if ablation_of is not None and search is not None:
            raise ValueError(f"{w}: an ablation takes {ablation_of!r}'s chosen settings; it has no search of its own")
        check_method(t, w)
        preset = PRESETS[t.get("preset", "toy-naive" if name == st["baseline"] else "toy-paper")] \
            if "preset" in t or name == st["baseline"] else None
        if preset is None:
            raise ValueError(f"{w}: name a preset as the method's base (e.g. preset = 'toy-l2sp'), then its fields")
        trained = train_config(cfg, w, t)
        space = preset.search if search is None else _space(search, w)
        from .config import post_hoc_of
        ablation = {k: v for k, v in t.items() if k not in ("preset", "schedule", "wise_ft", "post_hoc")} \
            if ablation_of else {}
        methods[name] = replace(preset, description=f"{name} (study {Path(path).name}; base preset "
                                f"{t.get('preset', 'toy-naive')})", train=trained, smoke_train=trained,
                                search=() if ablation_of else space, post_hoc=post_hoc_of(t),
                                ablation_of=ablation_of, ablation=ablation,
                                ingredients=_ingredients(post_hoc_of(t), space if not ablation_of else (), w))
        written[name] = t
    protocol = Protocol(baseline=st["baseline"], **{k: tuple(st[k]) for k in ("search_seeds", "final_seeds",
                                                                               "heldout_seeds") if k in st},
                        heldout=tuple(st.get("heldout", [st["baseline"]])),
                        second_search=tuple(st.get("second_search", [])),
                        trials=tuple(sorted(st.get("trials", {}).items())),
                        core=tuple(st["core"]) if "core" in st else None,
                        **{k: tuple(st[k]) for k in ("other_final_seeds",) if k in st},
                        **{k: st[k] for k in ("calibration_steps", "constraint", "soup_ingredients", "stock_seed",
                                              "constraint_seeds") if k in st})
    protocol.check(where)
    config = {k: v for k, v in cfg.items() if k != "study"}
    return Study(cfg["name"], StudyFile(path, config, written, methods), methods, protocol, config, written)


def _ingredients(post_hoc, space, where: str) -> str | None:
    """What a study method's post-hoc merge takes besides its own run (comparison.py makes them): Model Stock a
    second fine-tuning seed, soups the baseline at other learning rates. A merge of several runs has no search of
    its own (a trial has no other runs to merge: it would train and then fail)."""
    from ..methods.posthoc import ingredients_of
    if ingredients_of(post_hoc) and space:
        raise ValueError(f"{where}: post_hoc = {post_hoc!r} merges several runs that the comparison makes; it has no "
                         "search of its own: set search = [] (its strength is chosen on validation as it merges)")
    return ingredients_of(post_hoc)


def check_method_name(name, where: str) -> str:
    """A method's name is a folder name of its trials and runs (OUT/runs/final/NAME-sSEED): letters, digits, '-', '_'
    and '.', not only dots (a name like "../../x" would write outside --out)."""
    import re
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", name) or set(name) == {"."}:
        raise ValueError(f"{where} method name {name!r} is not a safe folder name: use letters, digits, '-', '_' and "
                         "'.' only (1-100 characters, not only dots), e.g. 'my-method'")
    return name


def _space(search, where: str) -> tuple:
    """A study file's search ranges, checked: `log` is true or false (a TOML boolean: "no" is not false), a range is
    searched on integers exactly when its TrainConfig field holds an integer (`spaces.int_field`; integer bounds on
    a float field are a float range), and an integer field takes integer bounds on a linear scale."""
    from .spaces import _field_types, int_field
    types = _field_types()
    if not isinstance(search, list):
        raise ValueError(f"{where} search must be a list of {{field, low, high, log}} tables, got {search!r}")
    out = []
    for s in search:
        if not isinstance(s, dict) or set(s) - SPACE_KEYS or not {"field", "low", "high"} <= set(s):
            raise ValueError(f"{where} search entry {s!r} must be {{field = ..., low = ..., high = ..., log = true}}")
        f = s["field"]
        if f not in types:
            raise ValueError(f"{where} search field {f!r} is not a TrainConfig field")
        if types[f] not in ("int", "float"):
            raise ValueError(f"{where} search field {f!r} holds a {types[f]}, not a number: only numeric fields are "
                             "searched (set it as a fixed field of the method instead)")
        lo, hi, log = s["low"], s["high"], s.get("log", False)
        if not isinstance(log, bool):
            raise ValueError(f"{where} search {f}: log = {log!r} must be true or false (a TOML boolean, unquoted)")
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        if not (number(lo) and number(hi) and lo < hi) or (log and lo <= 0):
            raise ValueError(f"{where} search {f}: need low < high (and low > 0 on a log scale), got "
                             f"{lo!r}, {hi!r}")
        if int_field(f):
            if not (isinstance(lo, int) and isinstance(hi, int)) or log:
                raise ValueError(f"{where} search {f}: {f} is an integer field; give integer bounds on a linear "
                                 f"scale (low = {int(lo)}, high = {int(hi)}, log = false), got {lo!r}, {hi!r}, "
                                 f"log = {log}")
        else:
            lo, hi = float(lo), float(hi)  # a float field: a float range however its bounds are written
        out.append((f, lo, hi, log))
    return tuple(out)
