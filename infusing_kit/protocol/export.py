"""The built-in world as files: `python -m infusing_kit export-world --out DIR` writes its images, split files,
caption CSV and the toy VLM as a checkpoint, one experiment config per preset and one study file (the built-in
comparison as a study). Running them reproduces the built-in runs (tests/test_config.py, tests/test_study.py).
The configs also name a second generic test domain, `[data.tests.marks]` (`marks_domain`; testsets.py): its metrics
and the mean over both generic domains and the target's test come beside the built-in run's, which stay the same.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .presets import PRESETS


def export_world(out: str | Path, seed: int = 0, smoke: bool = False, image_format: str = "png",
                 progress: bool = True) -> list[Path]:
    """Write the built-in world of `seed` as files in the formats above, the toy VLM pretrained on it as a
    checkpoint, and one config per preset (out/configs/<preset>.toml; a merge of several runs, a soup or Model Stock,
    trains the runs it merges first, as the preset does). Running such a config reproduces
    `experiment --preset P --seed N [--smoke]`. Returns the config paths."""
    from PIL import Image

    from .. import world as W
    from .experiment import pretrain_config, world_config
    from ..models import progress_bar, save_finetuned
    from ..pretrain import load_pretrained_toy
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
    marks = marks_domain(w.config)  # a second generic test domain: new files only, the world's own are as they were
    (out / "images" / "marks_test").mkdir()
    items = []
    for i, (img, c) in enumerate(zip(marks.images, marks.labels)):
        items.append({"path": f"images/marks_test/{i:05d}.{image_format}", "class_id": int(c)})
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(out / items[-1]["path"], **(
            {"quality": 95} if image_format == "jpg" else {}))
    (out / "generic" / "marks-test.json").write_text(json.dumps(items))
    with open(out / "text" / "test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for c, i in zip(w.text_test.captions, w.text_test.caption_image):
            writer.writerow([names["text_test"][int(i)], c])
    pcfg = pretrain_config(seed, smoke)
    vlm = load_pretrained_toy(pcfg.model, cfg=pcfg, progress=progress)
    model_file = f"model/{pcfg.model}-seed{seed}.pt"  # the configs point at it as ../model/...
    save_finetuned(vlm, out / model_file, extra={"pretrain": asdict(pcfg)})
    data = _DATA.format(model=pcfg.model, model_file=model_file, size=w.config.image_size)
    paths = []
    for preset in PRESETS:
        text = f'''# {preset}: {PRESETS[preset].description}
# The built-in world (seed {seed}{", smoke size" if smoke else ""}) exported by `python -m infusing_kit export-world`.
name = "{preset}"
seed = {seed}
{data}
[method]
preset = "{preset}"
schedule = "{"smoke" if smoke else "full"}"
'''
        paths.append(out / "configs" / f"{preset}.toml")
        paths[-1].write_text(text)
    paths.append(out / "configs" / "study.toml")
    paths[-1].write_text(study_text(data, smoke))
    return paths


def marks_domain(cfg):
    """The exported configs' second generic test domain ([data.tests.marks], image-image retrieval): squares carrying
    the far world's 16-bit mark patterns (`world.render_fine`), a domain no split of the near world holds, like the
    paper's other fine-grained test domains beside ImageNet. A quarter of the target test's number of classes (at
    least 8), `renders_per_combo` images each, drawn from a generator of its own (seeded by the world's seed), so
    the world's splits keep their bits."""
    from .. import world as W
    from ..datasets.data import Split
    rng = np.random.default_rng((cfg.seed, 35))
    classes = np.sort(rng.choice(W.N_FINE_CLASSES, max(8, cfg.fine_test_classes // 4), replace=False))
    labels = np.repeat(classes, cfg.renders_per_combo).astype(np.int64)
    return Split(W.render_fine(labels, int(rng.integers(2 ** 31)), cfg.image_size, cfg.fine_jitter, cfg.fine_mark_px),
                 labels)


def study_text(data: str, smoke: bool, methods: list[str] | None = None, protocol=None) -> str:
    """The built-in comparison as a study file on the exported world: the same methods (by their preset names),
    the same protocol. `compare --config` on it reproduces `compare` on the built-in world."""
    from .study import Study
    p = protocol or Study.builtin(smoke).protocol
    methods = methods or list(PRESETS)
    listed = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs if x in methods) + "]"
    seeds = lambda xs: "[" + ", ".join(str(x) for x in xs) + "]"
    budget = p.calibration_steps
    lines = ["# The built-in comparison as a study (exported by `python -m infusing_kit export-world`).",
             "# python -m infusing_kit compare --config THIS_FILE --out DIR reproduces `compare` on the built-in world.",
             'name = "builtin"', "seed = 0", data, "[study]", f'baseline = "{p.baseline}"',
             f"methods = {listed(methods)}", f"search_seeds = {seeds(p.search_seeds)}",
             f"final_seeds = {seeds(p.final_seeds)}", f"heldout_seeds = {seeds(p.heldout_seeds)}",
             f"heldout = {listed(p.heldout)}", f"second_search = {listed(p.second_search)}",
             f"calibration_steps = {budget}", f"constraint = {p.constraint}",
             f"soup_ingredients = {p.soup_ingredients}", f"stock_seed = {p.stock_seed}",
             f"constraint_seeds = {p.constraint_seeds}", f"other_final_seeds = {seeds(p.other_final_seeds)}"]
    if p.core is not None:
        lines.append(f"core = {listed(p.core)}")
    if p.trials:
        lines.append("trials = {" + ", ".join(f'"{m}" = {n}' for m, n in p.trials if m in methods) + "}")
    for m in methods:
        pre = PRESETS[m]
        lines += ["", f"[study.method.{m}]", f'preset = "{m}"', f'schedule = "{"smoke" if smoke else "full"}"']
        if pre.ablation_of:
            lines.append(f'ablation_of = "{pre.ablation_of}"')
            lines += [f"{k} = {_toml(v)}" for k, v in pre.ablation.items()]
    return "\n".join(lines) + "\n"


def _toml(v) -> str:
    return f'"{v}"' if isinstance(v, str) else ("true" if v is True else "false" if v is False else repr(v))


_DATA = '''
[model]
name = "{model}"
pretrained = "../{model_file}"

[data]
root = ".."
size = {size}

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

[data.tests.marks]                # a second generic image-image test domain (export.marks_domain, testsets.py)
kind = "image"
format = "split_file"
path = "generic/marks-test.json"
root = "."
'''
