"""Real runs from a config file: your model and your data, through the same experiment as the built-in world.

  python -m infusing_kit experiment --config FILE.toml --out DIR [--resume] [--registry FILE]

The file (TOML, read with the standard library) has four parts; README "Your own model and data" has a
complete example, and a minimal one:

  name = "siglip-sop-paper"      # the registry's method name (default: the file's name)
  seed = 0                       # the fine-tuning's seed (and random initialisation's, without pretrained weights)
  [model]   name = "ViT-B-16-SigLIP"; pretrained = "webli" (an open_clip tag, or a checkpoint file relative to
            the config's folder, a kit model.pt included; leave it out for random initialisation, seeded);
            image_size = 224 (optional); cache_dir = "..." (optional)
  [data]    root = "/data" (relative paths start here; default: the config's folder); size = 224 (decoded side);
            allow_leakage = false (true: no leakage check); label_space = "auto" | "shared" | "per_split" (leakage.py)
  [data.target]   train / val / test = {format = ..., path = ..., ...}         class-disjoint splits
  [data.generic]  train / val / test = {...}; prompts = "classes.txt" or prompt = "a photo of a {}."
  [data.text]     test = {format = "karpathy_json" | "caption_csv" | "text_embeddings", ...} (text_embeddings: the
                  paper's query records with precomputed text embeddings and ground truth: no text tower runs)
  A test split of queries against a gallery: test = {query = {format = ...}, index = {format = ...}};
  [data] merged_index = true adds the merged-index protocol (every domain's queries against one index).
  [data.tests.NAME] kind = "image" | "text" and a data part: extra test sets and their mean (testsets.py).
  [method]  preset = "toy-paper" (optional: its TrainConfig as the base; schedule = "full" | "smoke"),
            any TrainConfig field (steps, lr_backbone, l2sp, distill, sampler, ...),
            post_hoc = "wise_ft" | "lines" | "model_stock" | "soup_uniform" | "soup_greedy" (chosen on
            validation; wise_ft = true is the same). A merge of several runs first trains the runs it merges
            (Model Stock: another fine-tuning seed; soups: half and twice the backbone rate) into OUT/ingredients/.
A study file (study.py) has the same [model] and [data] and a [study] table instead of [method].

Formats of a data part: one row of `FORMATS` each, with the keys it takes besides format/path/root.

Every key is checked before any work: an unknown key, a value of the wrong type or range, a missing file or
folder, or an unknown format is an error naming the file, the table, the key, the value and what is expected
(the official code's full-method script silently ignored the regularizer weights it was given; here an unknown,
misspelt or mistyped key cannot pass). Every key is echoed into metrics.json ("config").
"""
from __future__ import annotations

import tomllib
from dataclasses import fields, replace
from pathlib import Path

from .experiment import PRESETS, Domains, Setup, check_overrides, run_merged
from .formats import (_BOOL, _NONNEG_INT, _POS_INT, _STR, FORMATS, Format, check_table, check_value,  # noqa: F401
                      read_split)  # (config.FORMATS etc. stay importable)
from ..models import config_embed_dim as _embed_dim
from .testsets import check_data, check_tests, read_tests
from ..train import TrainConfig

# ---------------------------------------------------------------------------- what a file may hold, typed (formats.py)
TOP = {"name": _STR, "seed": _NONNEG_INT, "model": None, "data": None, "method": None, "study": None}
MODEL = {"name": _STR, "pretrained": _STR, "image_size": _POS_INT, "cache_dir": _STR}
DATA = {"root": _STR, "size": _POS_INT, "allow_leakage": _BOOL, "merged_index": _BOOL, "target": None, "generic": None,
        "text": None, "tests": None, "label_space": (str, lambda v: v in ("auto", "shared", "per_split"),
                                      "'auto', 'shared' or 'per_split' (leakage.py)")}
PART = {"format": _STR, "path": _STR, "root": _STR}


def _template_ok(v: str) -> bool:
    """A prompt template gives two classes two prompts, and has no field but {} ('{{}}' is a literal, '{x}' no slot)."""
    try:
        return v.format("cat") != v.format("dog")
    except (KeyError, IndexError, ValueError, AttributeError):
        return False


GENERIC = {"prompts": _STR, "prompt": (str, _template_ok, "a string with {} where the class name goes and no other "
                                                          "{field} (write {{ and }} for literal braces), e.g. 'a "
                                                          "photo of a {}.'")}
METHOD = {"preset": _STR, "schedule": (str, lambda v: v in ("full", "smoke"), "'full' or 'smoke'"),
          "wise_ft": _BOOL, "post_hoc": _STR}


PARTS = {"target": ("train", "val", "test"), "generic": ("train", "val", "test"), "text": ("test",)}


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def load_config(path: str | Path, kind: str = "method") -> dict:
    """Parse and check a config file (kind "method": an experiment; "study": a study file, checked further by
    study.load_study); returns it with every path resolved. Nothing is loaded yet."""
    path = Path(path)
    cfg = read_toml(path)
    top = {k: v for k, v in TOP.items() if k not in (("study",) if kind == "method" else ("method",))}
    check_table(cfg, top, str(path), required={"model", "data", kind})
    check_table(cfg["model"], MODEL, f"{path} [model]", required={"name"})
    pre = cfg["model"].get("pretrained")
    if pre == "toy":
        raise ValueError(f"{path} [model] pretrained = 'toy': the toy VLM is a checkpoint file in a config; "
                         "`python -m infusing_kit export-world --out DIR` writes it (pretrained = \"../model/...pt\")")
    if pre is not None and ("/" in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))):
        cfg["model"]["pretrained"] = str(_exists((path.parent / pre).resolve(), f"{path} [model] pretrained"))
    d = cfg["data"]
    check_table(d, DATA, f"{path} [data]", required={"target", "generic", "text"})
    root = Path(d.get("root", path.parent))
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    for group, parts in PARTS.items():
        check_table(d[group], {**{p: None for p in parts}, **(GENERIC if group == "generic" else {})},
                    f"{path} [data.{group}]", required=set(parts))
        for part in parts:
            where = f"{path} [data.{group}.{part}]"
            if group != "text" and part == "test" and isinstance(d[group][part], dict) and "query" in d[group][part]:
                check_table(d[group][part], {"query": None, "index": None}, where, required={"query", "index"})
                d[group][part] = {k: _part(d[group][part][k], root, f"{where} {k}") for k in ("query", "index")}
            else:
                d[group][part] = _part(d[group][part], root, where)
    if "tests" in d:  # extra image-image and image-text test sets, [data.tests.NAME] (testsets.py)
        d["tests"] = check_tests(d["tests"], root, path, _part)
    if d.get("merged_index") and d["target"]["test"] == d["generic"]["test"]:
        raise ValueError(f"{path} [data] merged_index = true, but [data.generic] test is [data.target] test (the same "
                         f"{d['target']['test'].get('format', 'query/index')} part): the merged index would hold every "
                         "image twice under two domains' labels. Give the generic domain its own test split, or set "
                         "merged_index = false")
    if "prompts" in d["generic"]:
        d["generic"]["prompts"] = str(_exists(root / d["generic"]["prompts"], f"{path} [data.generic] prompts"))
    if kind == "method":
        check_method(cfg["method"], f"{path} [method]")
        train_config(cfg, str(path))  # every TrainConfig value checked now (types, ranges, allowed values)
    cfg["name"] = cfg.get("name", path.stem)
    cfg["_path"] = str(path.resolve())
    return cfg


def check_method(m: dict, where: str) -> None:
    """A method table: the METHOD keys and TrainConfig fields (their values are checked by TrainConfig)."""
    check_table(m, {**METHOD, **{f.name: None for f in fields(TrainConfig)}}, where)
    if "seed" in m:
        raise ValueError(f"{where}: set the seed at the top level (seed = N), not in the method")
    if "preset" in m and m["preset"] not in PRESETS:
        raise ValueError(f"{where} preset {m['preset']!r} is unknown; choose one of {sorted(PRESETS)}")
    if "post_hoc" in m:
        from ..methods.posthoc import METHODS
        if m["post_hoc"] not in METHODS:
            raise ValueError(f"{where} post_hoc {m['post_hoc']!r} is unknown; choose one of {sorted(METHODS)}")


def train_config(cfg: dict, where: str = "the config", method: dict | None = None) -> TrainConfig:
    m = dict(cfg["method"] if method is None else method)
    preset = PRESETS.get(m.pop("preset", None) or "toy-naive")
    base = preset.smoke_train if m.pop("schedule", "full") == "smoke" else preset.train
    for k in ("wise_ft", "post_hoc"):
        m.pop(k, None)
    try:
        return replace(base, seed=int(cfg.get("seed", 0)), **check_overrides(m))
    except ValueError as e:
        raise ValueError(f"{where} [method]: {e}") from None


def post_hoc_of(m: dict) -> str | None:
    preset = PRESETS[m.get("preset", "toy-naive")]
    if m.get("wise_ft") is False:
        return None
    return m.get("post_hoc", "wise_ft" if m.get("wise_ft") is True else preset.post_hoc)


def setup_from_config(cfg: dict | str | Path, device: str = "cpu", progress: bool = True,
                      method: dict | None = None, name: str | None = None) -> Setup:
    """The experiment a config describes (data opened and checked, model loaded lazily). method/name: the method
    table and registry name to use instead of the file's [method] (a study's methods)."""
    from ..models import load_model
    if not isinstance(cfg, dict):
        cfg = load_config(cfg)
    where = cfg.get("_path", "the config")
    mc, d = cfg["model"], cfg["data"]
    m = cfg["method"] if method is None else method
    read = lambda group, part: read_split(cfg, group, part)
    generic_train = read("generic", "train")
    domains = Domains(read("target", "train"), read("target", "val"), read("target", "test"), generic_train,
                      read("generic", "val"), read("generic", "test"), read("text", "test"),
                      _prompts(d["generic"], generic_train, where), d.get("merged_index", False), read_tests(cfg))
    from ..datasets.leakage import check_domains
    from ..datasets.precheck import check_retrieval
    check_retrieval(domains, d, where)  # before any work: a split no query can be scored on is named now
    if hasattr(domains.text_test, "text_embeddings"):  # precomputed text embeddings: as wide as the model's images
        from ..datasets.textprobe import check_width
        check_width(domains.text_test, _embed_dim(mc["name"]), mc["name"], f"{where} [data.text.test] "
                    f"{d['text']['test'].get('embeddings')}")
    check_domains(domains, where, allowed=d.get("allow_leakage", False), label_space=d.get("label_space", "auto"))
    check_data(domains, d, where, lambda: _embed_dim(mc["name"]))  # the extra test sets (testsets.py)
    seed = int(cfg.get("seed", 0))
    model = lambda: load_model(mc["name"], mc.get("pretrained"), device=device, image_size=mc.get("image_size"),
                               cache_dir=mc.get("cache_dir"), seed=seed)
    preset = m.get("preset", "toy-naive")
    overrides = {k: v for k, v in m.items() if k not in METHOD}
    source = {"config": {k: v for k, v in cfg.items() if k != "_path"}, "config_file": cfg.get("_path"),
              "data_sizes": {f: len(getattr(domains, f)) for f in ("target_train", "target_val", "target_test",
                                                                     "generic_train", "generic_val", "generic_test",
                                                                     "text_test")}}
    label = name or cfg["name"]
    from ..methods.posthoc import ingredients_of
    return Setup(label, f"{label} (config file; method from preset {preset!r} and its overrides)", model, domains,
                 train_config(cfg, where, m), post_hoc_of(m), seed, m.get("schedule") == "smoke", source, overrides,
                 ingredients_of(post_hoc_of(m)))


def run_config(path: str | Path, out_dir: str | Path, device: str = "cpu", progress: bool = True,
               registry: str | Path | None = None, resume: bool = False, test: bool = True) -> dict:
    """Run the experiment of a config file; writes out_dir/metrics.json (see experiment.run_setup). A merge of
    several runs trains the runs it merges first (`experiment.run_merged`)."""
    setup = setup_from_config(path, device=device, progress=progress)
    return run_merged(setup, out_dir, device=device, progress=progress, test=test, registry=registry, resume=resume)


def _prompts(generic: dict, generic_train, where: str) -> list[str] | None:
    """One text per generic class: a prompts file (one line per class, in label order) or a template."""
    if "prompts" in generic:
        try:
            prompts = [l.rstrip("\n") for l in open(generic["prompts"], encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} [data.generic] prompts {generic['prompts']} is not UTF-8 text ({e.reason}); "
                             "save it as UTF-8") from None
        n = int(generic_train.labels.max()) + 1
        if len(prompts) < n or any(not p.strip() for p in prompts[:n]):
            raise ValueError(f"{where} [data.generic] prompts {generic['prompts']} has {len(prompts)} lines (empty "
                             f"ones count as missing) for {n} generic classes: one non-empty prompt per class, in "
                             "label order")
        return prompts
    if "prompt" in generic:
        if not generic_train.class_names:
            raise ValueError(f"{where} [data.generic] prompt needs class names (an image folder); give prompts = FILE")
        return [generic["prompt"].format(n.replace("_", " ")) for n in generic_train.class_names]
    return None


# ---------------------------------------------------------------------------- checks
def _exists(p: Path, where: str) -> Path:
    if not p.exists():
        raise FileNotFoundError(f"{where}: {p} does not exist")
    return p


def _part(part, root: Path, where: str) -> dict:
    every = {**PART, **{k: v for f in FORMATS.values() for k, v in f.keys.items()}}
    check_table(part, every, where, required={"format", "path"})
    fmt = part["format"]
    if fmt not in FORMATS:
        raise ValueError(f"{where}: unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    check_table(part, {**PART, **FORMATS[fmt].keys}, where)
    out = dict(part)
    out["path"] = str(_exists(root / part["path"], where))
    for key in FORMATS[fmt].files:
        if key in part:
            out[key] = str(_exists(root / part[key], f"{where} {key}"))
    if "root" in part:
        out["root"] = str(_exists(root / part["root"], f"{where} root"))
    return out

