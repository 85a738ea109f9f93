"""Real runs from a config file: your model and your data, through the same experiment as the built-in world.

  python -m infusing_kit experiment --config FILE.toml --out DIR [--resume] [--registry FILE]

The file (TOML, read with the standard library) has four parts; README "Your own model and data" has a
complete example:

  name = "siglip-sop-paper"      # the registry's method name (default: the file's name)
  seed = 0
  [model]   name = "ViT-B-16-SigLIP"; pretrained = "webli" (an open_clip tag, or a checkpoint file relative to
            the config's folder, a kit model.pt included); image_size = 224 (optional); cache_dir = "..." (optional)
  [data]    root = "/data" (relative paths start here; default: the config's folder); size = 224 (decoded side)
  [data.target]   train / val / test = {format = ..., path = ..., ...}         class-disjoint splits
  [data.generic]  train / val / test = {...}; prompts = "classes.txt" or prompt = "a photo of a {}."
  [data.text]     test = {format = "karpathy_json" | "caption_csv", ...}
  [method]  preset = "toy-paper" (optional: its TrainConfig as the base; schedule = "full" | "smoke"),
            any TrainConfig field (steps, lr_backbone, l2sp, distill, sampler, ...),
            post_hoc = "wise_ft" | "lines" (a post-hoc step chosen on validation; wise_ft = true is the same)

Formats of a data part: "image_folder" (root/<class>/<image>), "split_file" (UnED JSON: [{path, class_id}]),
"csv" (path,label), "generic_folder" (an image folder split 80/20 per class, seeded: part = "train" | "val";
seed; val_fraction), "caption_csv" (image,caption), "karpathy_json" (Flickr30k / COCO; split = "test").
Optional keys of a part: root (the folder its paths are relative to), skip_unreadable, max_per_class.

Every key is checked before any work: an unknown key, a missing file or folder, or an unknown format is an
error naming it (the official code's full-method script silently ignored the regularizer weights it was given;
here an unknown or misspelt key cannot pass). Every key is echoed into metrics.json ("config").
"""
from __future__ import annotations

import csv
import json
import tomllib
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np

from . import data as D
from .experiment import PRESETS, Domains, Setup, check_overrides, run_setup
from .train import TrainConfig

TOP = {"name", "seed", "model", "data", "method"}
MODEL = {"name", "pretrained", "image_size", "cache_dir"}
DATA = {"root", "size", "target", "generic", "text"}
FORMATS = {  # format: (reader, keys it takes besides format/path/root)
    "image_folder": ({"max_per_class", "skip_unreadable"}),
    "split_file": ({"skip_unreadable"}),
    "csv": ({"skip_unreadable"}),
    "generic_folder": ({"part", "seed", "val_fraction", "max_per_class", "skip_unreadable"}),
    "caption_csv": set(),
    "karpathy_json": ({"split"}),
}
PARTS = {"target": ("train", "val", "test"), "generic": ("train", "val", "test"), "text": ("test",)}


def load_config(path: str | Path) -> dict:
    """Parse and check a config file; returns it with every path resolved. Nothing is loaded yet."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from None
    _keys(cfg, TOP, str(path), required={"model", "data", "method"})
    _keys(cfg["model"], MODEL, f"{path} [model]", required={"name"})
    pre = cfg["model"].get("pretrained")
    if isinstance(pre, str) and ("/" in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        cfg["model"]["pretrained"] = str(_exists((path.parent / pre).resolve(), f"{path} [model] pretrained"))
    d = cfg["data"]
    _keys(d, DATA, f"{path} [data]", required={"target", "generic", "text"})
    root = Path(d.get("root", path.parent))
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    for group, parts in PARTS.items():
        extra = {"prompts", "prompt"} if group == "generic" else set()
        _keys(d[group], set(parts) | extra, f"{path} [data.{group}]", required=set(parts))
        for part in parts:
            d[group][part] = _part(d[group][part], root, f"{path} [data.{group}.{part}]")
    if "prompts" in d["generic"]:
        d["generic"]["prompts"] = str(_exists(root / d["generic"]["prompts"], f"{path} [data.generic] prompts"))
    m = cfg["method"]
    known = {f.name for f in fields(TrainConfig)} | {"preset", "schedule", "wise_ft", "post_hoc"}
    _keys(m, known, f"{path} [method]")
    if "seed" in m:
        raise ValueError(f"{path} [method]: set the seed at the top level (seed = N), not in [method]")
    if "preset" in m and m["preset"] not in PRESETS:
        raise ValueError(f"{path} [method] preset {m['preset']!r} is unknown; choose one of {sorted(PRESETS)}")
    if m.get("schedule", "full") not in ("full", "smoke"):
        raise ValueError(f"{path} [method] schedule must be 'full' or 'smoke', got {m['schedule']!r}")
    train_config(cfg)  # every TrainConfig value checked now (ranges, allowed values)
    cfg["name"] = cfg.get("name", path.stem)
    cfg["_path"] = str(path.resolve())
    return cfg


def train_config(cfg: dict) -> TrainConfig:
    m = dict(cfg["method"])
    preset = PRESETS.get(m.pop("preset", None) or "toy-naive")
    base = preset.smoke_train if m.pop("schedule", "full") == "smoke" else preset.train
    m.pop("wise_ft", None)
    m.pop("post_hoc", None)
    return replace(base, seed=int(cfg.get("seed", 0)), **check_overrides(m))


def setup_from_config(cfg: dict | str | Path, device: str = "cpu", progress: bool = True) -> Setup:
    """The experiment a config describes (data opened and checked, model loaded lazily)."""
    from .models import load_model
    if not isinstance(cfg, dict):
        cfg = load_config(cfg)
    mc = cfg["model"]
    d = cfg["data"]
    size = int(d.get("size") or mc.get("image_size") or _model_size(mc["name"]))
    read = lambda group, part: _read(d[group][part], size)
    prompts = None
    if "prompts" in d["generic"]:
        prompts = [l.rstrip("\n") for l in open(d["generic"]["prompts"])]
    generic_train = read("generic", "train")
    if prompts is None and "prompt" in d["generic"]:
        if not generic_train.class_names:
            raise ValueError("[data.generic] prompt needs class names (an image folder); give prompts = FILE instead")
        prompts = [d["generic"]["prompt"].format(n.replace("_", " ")) for n in generic_train.class_names]
    domains = Domains(read("target", "train"), read("target", "val"), read("target", "test"), generic_train,
                      read("generic", "val"), read("generic", "test"), read("text", "test"), prompts)
    if not domains.text_test.captions:
        raise ValueError("[data.text] test has no captions: use format = 'karpathy_json' or 'caption_csv'")
    model = lambda: load_model(mc["name"], mc.get("pretrained"), device=device, image_size=mc.get("image_size"),
                               cache_dir=mc.get("cache_dir"))
    m = cfg["method"]
    preset = m.get("preset", "toy-naive")
    post = m.get("post_hoc", "wise_ft" if m.get("wise_ft") is True else PRESETS[preset].post_hoc)
    if m.get("wise_ft") is False:
        post = None
    overrides = {k: v for k, v in m.items() if k not in ("preset", "schedule", "wise_ft", "post_hoc")}
    source = {"config": {k: v for k, v in cfg.items() if k != "_path"}, "config_file": cfg.get("_path"),
              "data_sizes": {f: len(getattr(domains, f)) for f in ("target_train", "target_val", "target_test",
                                                                     "generic_train", "generic_val", "generic_test",
                                                                     "text_test")}}
    return Setup(cfg["name"], f"{cfg['name']} (config file; method from preset {preset!r} and its overrides)", model,
                 domains, train_config(cfg), post, int(cfg.get("seed", 0)), m.get("schedule") == "smoke", source,
                 overrides)


def run_config(path: str | Path, out_dir: str | Path, device: str = "cpu", progress: bool = True,
               registry: str | Path | None = None, resume: bool = False, test: bool = True) -> dict:
    """Run the experiment of a config file; writes out_dir/metrics.json (see experiment.run_setup)."""
    setup = setup_from_config(path, device=device, progress=progress)
    return run_setup(setup, out_dir, device=device, progress=progress, test=test, registry=registry, resume=resume)


# ---------------------------------------------------------------------------- checks
def _keys(section, allowed: set, where: str, required: set = frozenset()) -> None:
    if not isinstance(section, dict):
        raise ValueError(f"{where} must be a table (key = value pairs), got {section!r}")
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(set(required) - set(section))
    if missing:
        raise ValueError(f"{where}: missing {missing}")


def _exists(p: Path, where: str) -> Path:
    if not p.exists():
        raise FileNotFoundError(f"{where}: {p} does not exist")
    return p


def _part(part, root: Path, where: str) -> dict:
    _keys(part, {"format", "path", "root"} | set().union(*FORMATS.values()), where, required={"format", "path"})
    fmt = part["format"]
    if fmt not in FORMATS:
        raise ValueError(f"{where}: unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    _keys(part, {"format", "path", "root"} | FORMATS[fmt], where)
    if fmt == "generic_folder" and part.get("part", "train") not in ("train", "val"):
        raise ValueError(f"{where}: part must be 'train' or 'val', got {part['part']!r}")
    out = dict(part)
    out["path"] = str(_exists(root / part["path"], where))
    if "root" in part:
        out["root"] = str(_exists(root / part["root"], f"{where} root"))
    return out


def _read(part: dict, size: int):
    fmt, path, root = part["format"], part["path"], part.get("root")
    skip = bool(part.get("skip_unreadable", False))
    if fmt == "image_folder":
        return D.image_folder(path, size, part.get("max_per_class"), skip)
    if fmt == "split_file":
        return D.split_file(path, size, root, skip)
    if fmt == "csv":
        return D.csv_split(path, size, root, skip)
    if fmt == "generic_folder":
        train, val = D.generic_folder(path, size, int(part.get("seed", 0)), float(part.get("val_fraction", 0.2)),
                                      part.get("max_per_class"), skip)
        return train if part.get("part", "train") == "train" else val
    if fmt == "caption_csv":
        return D.caption_csv(path, size, root)
    return D.karpathy_json(path, size, root or Path(path).parent, part.get("split", "test"))


def _model_size(name: str) -> int:
    import open_clip
    cfg = open_clip.get_model_config(name) or {}
    size = cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


# ---------------------------------------------------------------------------- the built-in world, as files
def export_world(out: str | Path, seed: int = 0, smoke: bool = False, image_format: str = "png",
                 progress: bool = True) -> list[Path]:
    """Write the built-in world of `seed` as files in the formats above, the toy VLM pretrained on it as a
    checkpoint, and one config per preset (out/configs/<preset>.toml). Running such a config reproduces
    `experiment --preset P --seed N [--smoke]`. Returns the config paths."""
    from PIL import Image

    from . import world as W
    from .experiment import pretrain_config, world_config
    from .models import progress_bar, save_finetuned
    from .pretrain import load_pretrained_toy
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' (lossless, reproduces the built-in runs) or 'jpg', got {image_format!r}")
    out = Path(out)
    if (out / "configs").exists():
        raise FileExistsError(f"{out} already holds an exported world; choose a new --out folder (nothing was overwritten)")
    w = W.make_world(world_config(seed, smoke))
    splits = {"fine_train": w.fine_train, "fine_val": w.fine_val, "fine_test": w.fine_test,
              "generic_train": w.generic_train, "generic_val": w.generic_val, "generic_test": w.generic_test,
              "text_test": w.text_test}
    names = {}
    for name, split in progress_bar(splits.items(), progress, desc="export images", total=len(splits)):
        (out / "images" / name).mkdir(parents=True, exist_ok=True)
        names[name] = []
        for i, img in enumerate(split.images):
            rel = f"images/{name}/{i:05d}.{image_format}"
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / rel, quality=95) if image_format == "jpg" else \
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / rel)
            names[name].append(rel)
    for folder in ("target", "generic", "text", "model", "configs"):
        (out / folder).mkdir(exist_ok=True)
    for part in ("train", "val", "test"):  # the official split-file format (ordered: same batches as built in)
        s = splits[f"fine_{part}"]
        (out / "target" / f"{part}.json").write_text(json.dumps(
            [{"path": p, "class_id": int(c)} for p, c in zip(names[f"fine_{part}"], s.labels)]))
    with open(out / "generic" / "train.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{p},{int(c)}\n" for p, c in zip(names["generic_train"], w.generic_train.labels)))
    for part in ("val", "test"):
        s = splits[f"generic_{part}"]
        (out / "generic" / f"{part}.json").write_text(json.dumps(
            [{"path": p, "class_id": int(c)} for p, c in zip(names[f"generic_{part}"], s.labels)]))
    attrs = W.combo_to_attributes(np.arange(W.N_COMBOS))
    (out / "generic" / "prompts.txt").write_text("".join(W.caption(a) + "\n" for a in attrs))
    with open(out / "text" / "test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for c, i in zip(w.text_test.captions, w.text_test.caption_image):
            writer.writerow([names["text_test"][int(i)], c])
    pcfg = pretrain_config(seed, smoke)
    vlm = load_pretrained_toy(pcfg.model, cfg=pcfg, progress=progress)
    model_file = f"model/{pcfg.model}-seed{seed}.pt"  # the configs point at it as ../model/...
    save_finetuned(vlm, out / model_file, extra={"pretrain": asdict(pcfg)})
    paths = []
    for preset in PRESETS:
        text = f'''# {preset}: {PRESETS[preset].description}
# The built-in world (seed {seed}{", smoke size" if smoke else ""}) exported by `python -m infusing_kit export-world`.
name = "{preset}"
seed = {seed}

[model]
name = "{pcfg.model}"
pretrained = "../{model_file}"

[data]
root = ".."
size = {w.config.image_size}

[data.target]
train = {{format = "split_file", path = "target/train.json", root = "."}}
val = {{format = "split_file", path = "target/val.json", root = "."}}
test = {{format = "split_file", path = "target/test.json", root = "."}}

[data.generic]
train = {{format = "csv", path = "generic/train.csv", root = "."}}
val = {{format = "split_file", path = "generic/val.json", root = "."}}
test = {{format = "split_file", path = "generic/test.json", root = "."}}
prompts = "generic/prompts.txt"

[data.text]
test = {{format = "caption_csv", path = "text/test.csv", root = "."}}

[method]
preset = "{preset}"
schedule = "{"smoke" if smoke else "full"}"
'''
        paths.append(out / "configs" / f"{preset}.toml")
        paths[-1].write_text(text)
    return paths
