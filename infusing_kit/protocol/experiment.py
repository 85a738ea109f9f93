"""Whole experiments: a pretrained model -> fine-tune -> evaluate, written to metrics.json.

An experiment = a model + a target domain (train / val / test, class-disjoint) + a generic domain (train for
the regularizers, val for selection, test for reporting) + an image-text test set + a method (a TrainConfig).
`Domains` holds the data; `Setup` the whole experiment. Two providers build them, and everything after that
(`run_setup`: training, validation, test metrics, metrics.json, the registry, the search) is the same:
- the built-in world: `run_experiment(preset, out_dir, seed=...)` (`toy_setup`);
- files on disk, from a TOML config: `config.run_config(path, out_dir)` (README "Your own model and data").

out_dir/metrics.json:
    {"preset", "description", "seed", "smoke", "model", "device", "source": {...what data and model},
     "train": TrainConfig, "overrides", "best_step", "val", "updates", "warnings", "train_seconds", "seconds",
     "pretrained": {"in_domain": {...}, "generic_image": {...}, "image_text": {...}}, "finetuned": {...},
     post-hoc runs also "post_hoc", "post_hoc_curve" (every candidate's validation), "post_hoc_chosen", "merged"}
in_domain: fine-grained test retrieval (class-disjoint from training): map@20, mmp@20, r@1.
generic_image: generic test image-image retrieval, same keys.
image_text: image-caption pairs: i2t_r@1/5/10, t2i_r@1/5/10 (captions by the frozen text tower, or precomputed).
merged (with Domains.merged_index): both retrievals against one merged index (evaluation.evaluate).
tests (only with extra test sets, a config's [data.tests]): their metrics and the mean over datasets (testsets.py).
Validation (checkpoint selection, search) uses the target val classes and the generic val images only.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import distributed
from . import testsets
from .. import world as W
from ..checkpoints import FolderLock, atomic_write_text, check_writable
from ..datasets.containers import Domains  # (experiment.Domains stays importable)
from ..identity import check_identity, code_version, run_identity
from ..evaluation import VALIDATION_KEYS, evaluate, validation_fn  # (experiment.evaluate etc. stay importable)
from ..metrics import K
from ..models import VLM, embed_images, embed_texts, save_finetuned
from ..pretrain import FAR_PRETRAIN, PretrainConfig, load_pretrained_toy
from ..methods.inputs import prepare_inputs
from .presets import NAIVE, PRESETS, SMOKE_NAIVE, SMOKE_WORLD, Preset, ingredient_overrides
from ..train import TrainConfig, train
from ..trainconfig import with_defaults



WORLDS = ("near", "near-v1", "far")


def world_config(seed: int, smoke: bool, world: str = "near") -> W.WorldConfig:
    """The world of an experiment. near (the default): one fixed world (seed 0), as the paper has one dataset; the
    run's seed varies the fine-tuning only. near-v1: the same world with the first design of its held-out splits
    (`world.NEAR_V1`: a validation easier than the test), kept to reproduce what was measured on it. far (the kit's
    first world): the seed also draws the world."""
    _check_world(world)
    size = SMOKE_WORLD if smoke else {}
    if world == "far":
        return replace(W.FAR, seed=seed, **size)
    return replace(W.NEAR_V1 if world == "near-v1" else W.WorldConfig(), seed=0, **size)


def pretrain_config(seed: int, smoke: bool = False, world: str = "near") -> PretrainConfig:
    """The toy VLM of an experiment. near: one fixed pretrained model (seed 0), as the paper fine-tunes one
    checkpoint (the far world's five pretrained models, seeds 0-4 of results/toy-comparison-cpu-v2.jsonl, score
    generic test mAP@20 0.73-0.87 and image-to-text R@1 0.53-0.80: there the seed changed the starting model as
    much as the fine-tuning). far: pretrained with the run's seed, as its registry was made.
    Smoke runs use the same model: a smaller one does not learn the fine-grained task within a smoke schedule."""
    _check_world(world)
    return replace(FAR_PRETRAIN, seed=seed) if world == "far" else PretrainConfig()


def _check_world(world: str) -> None:
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")


# ---------------------------------------------------------------------------- what an experiment is made of
@dataclass
class Setup:
    """One experiment, ready to run: `model()` returns the pretrained VLM (loaded fresh each call)."""
    name: str                         # the preset (or config) name: the registry's "method"
    description: str
    model: Callable[[], VLM]
    domains: Domains
    train: TrainConfig
    post_hoc: str | None = None       # a posthoc.METHODS row applied after training
    seed: int = 0
    smoke: bool = False
    source: dict = field(default_factory=dict)   # where model and data come from (echoed into metrics.json)
    overrides: dict = field(default_factory=dict)
    ingredients: str | None = None    # a merge of several runs: what the others are ("seeds", "lrs"; `run_merged`)


def toy_setup(preset: str, seed: int = 0, smoke: bool = False, device: str = "cpu", overrides: dict | None = None,
              cache_dir: str | Path | None = None, progress: bool = True, train_seed: int | None = None,
              world: str = "near") -> Setup:
    """A preset on a built-in world and the toy VLM pretrained on it (`world_config`, `pretrain_config`). train_seed:
    a different seed for the fine-tuning only (head, batches, augmentation), the world and the pretrained model
    unchanged (in the near world, `seed` already is only the fine-tuning's)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    overrides = check_overrides(overrides)
    p = PRESETS[preset]
    cfg = replace(p.smoke_train if smoke else p.train, seed=seed if train_seed is None else train_seed, **overrides)
    wcfg, pcfg = world_config(seed, smoke, world), pretrain_config(seed, smoke, world)
    model = lambda: load_pretrained_toy(pcfg.model, device=device, cache_dir=cache_dir, cfg=pcfg, progress=progress)
    return Setup(preset, p.description, model, W.domains(W.make_world(wcfg)), cfg, p.post_hoc, seed, smoke,
                 {"world": asdict(wcfg), "pretrain": asdict(pcfg), "model": pcfg.model}, overrides, p.ingredients)


def _kept_validation(history: list[dict], best_step: int | None) -> dict[str, float]:
    rows = [h for h in history if f"val/mean_map@{K}" in h and h["target_step"] == best_step]
    return {k[4:]: v for k, v in rows[-1].items() if k.startswith("val/")} if rows else {}


def generic_class_prompts(vlm: VLM, prompts: list[str] | None = None) -> torch.Tensor:
    """(C, D) text embeddings of one prompt per generic class (default: the built-in world's 5,760 combinations)."""
    if prompts is None:
        attrs = W.combo_to_attributes(np.arange(W.N_COMBOS))
        prompts = [W.caption(a) for a in attrs]
    return torch.from_numpy(embed_texts(vlm, prompts, progress=False))


def check_overrides(overrides: dict | None) -> dict:
    """TrainConfig fields to change; an unknown key is an error naming it (never silently ignored)."""
    overrides = dict(overrides or {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s) {unknown} in overrides; known fields: {sorted(known)}")
    if "seed" in overrides:
        raise ValueError("overrides may not set 'seed': pass seed=... (it also seeds the world and the toy VLM)")
    return overrides


# ---------------------------------------------------------------------------- running
def run_setup(setup: Setup, out_dir: str | Path, device: str = "cpu", progress: bool = True, test: bool = True,
              registry: str | Path | None = None, hooks: tuple = (), resume: bool = False,
              reuse: str | Path | None = None, merge_with: tuple = (), keep_weights: bool = True,
              keep_checkpoints: bool = False) -> dict:
    """Fine-tune and evaluate one experiment; write out_dir/metrics.json (never over an existing one).

    test=False skips the test sets entirely (a search looks at validation only). registry: a results file to
    append one row to. hooks: passed to train(). resume=True continues an interrupted run in out_dir.
    Post-hoc presets (setup.post_hoc): reuse = a finished run folder of the same training (same TrainConfig but the
    seed's, same starting weights) whose fine-tuned tower is taken instead of training again; merge_with = model.pt
    files of other fine-tuned runs of the same pretrained model, for merges (Model Stock, soups).
    Files: out/model.pt (the kept tower and head; keep_weights=False writes none: a search trial's weights serve
    nothing), out/metrics.json, out/run/log.jsonl; the resume files run/last.pt and run/best.pt are removed once
    metrics.json is written (keep_checkpoints=True keeps them)."""
    out = Path(out_dir)
    lock = None
    if distributed.is_main():  # one process per folder, from the start (a second one is refused at once)
        check_writable(out, "--out")
        lock = FolderLock(out, "--out")
    try:
        return _run_setup(setup, out, device, progress, test, registry, hooks, resume, reuse, merge_with, keep_weights,
                          keep_checkpoints)
    finally:
        if lock is not None:
            lock.release()


def _run_setup(setup, out, device, progress, test, registry, hooks, resume, reuse, merge_with, keep_weights,
               keep_checkpoints) -> dict:
    from ..methods import posthoc
    if (out / "metrics.json").exists():
        raise FileExistsError(f"{out / 'metrics.json'} exists: that run is finished; choose a new --out folder "
                              "(nothing was overwritten)")
    if (out / "run").exists() and any((out / "run").iterdir()) and not resume:
        raise FileExistsError(f"{out} holds an interrupted run: add --resume (resume=True) to continue it, or choose "
                              "a new --out folder (nothing was overwritten)")
    main = distributed.is_main()  # under torchrun only rank 0 writes
    if registry is not None and main:
        if Path(registry).is_dir():
            raise IsADirectoryError(f"--registry {registry} is a folder; give the path of a JSON-lines file (e.g. "
                                    f"{Path(registry) / 'results.jsonl'})")
        check_writable(Path(registry).parent, "--registry")
        if Path(registry).exists() and not os.access(registry, os.W_OK):
            raise PermissionError(f"--registry {registry} is not writable; choose a file you can write to")
    t0 = time.time()
    code = code_version()  # (read when the run starts)
    cfg, d = setup.train, setup.domains
    known = set(VALIDATION_KEYS)
    if cfg.select not in known:
        raise ValueError(f"select = {cfg.select!r} is not a validation score; choose one of {sorted(known)}")
    from ..train import _check_data
    _check_data(cfg, d.target_train, d.generic_train)  # before any model is loaded or evaluated
    vlm = setup.model()
    distributed.broadcast_module(vlm.model)  # under torchrun: every rank starts from rank 0's weights
    identity = run_identity(vlm, device)
    before = _pretrained_test(vlm, d, identity) if test else None
    before_sets = testsets.pretrained_tests(vlm, d, before, identity) if test and d.tests else None
    theta0 = posthoc.states_of(vlm)
    reference = embed_images(vlm, d.generic_val, progress=False)  # for the logged teacher agreement
    if reuse is not None:
        head, result = None, _reused(Path(reuse), cfg, identity, vlm)
    else:
        extra = prepare_inputs(vlm, cfg, d, teacher_path=out / "teacher.npy" if len(d.generic_train) > 50_000 else None)
        head, result = train(vlm, d.target_train, cfg, out_dir=out / "run", generic=d.generic_train,
                             validate=validation_fn(d, reference), progress=progress, hooks=hooks, resume=resume,
                             resume_hint="--resume (resume=True)", **extra)
    val = _kept_validation(result.history, result.best_step)
    curve = None
    if setup.post_hoc:  # chosen on validation, like any other strength
        thetas = [posthoc.states_of(vlm)] + [posthoc.load_tower(m) for m in merge_with]
        curve, chosen = posthoc.choose(setup.post_hoc, vlm, theta0, thetas, validation_fn(d), f"mean_map@{K}")
        val = {k: v for k, v in chosen.items() if k in val or k.endswith(f"map@{K}")}
    embedded = {}
    after = evaluate(vlm, d, keep=embedded) if test else None
    after_sets = testsets.evaluate_tests(vlm, d, after, embedded=embedded) if test and d.tests else None
    if main and keep_weights:
        save_finetuned(vlm, out / "model.pt", head)  # the kept (or merged) image tower: load_model(name, this file)
    where = torch.device(device)
    metrics = {"preset": setup.name, "description": setup.description, "seed": setup.seed, "smoke": setup.smoke,
               "model": vlm.name, "device": f"{where.type} (bf16 autocast)" if where.type == "cuda" else
               f"{where.type} (float32)", **setup.source, "train": asdict(cfg), "overrides": setup.overrides,
               "best_step": result.best_step, "val": val, "post_hoc": setup.post_hoc, "post_hoc_curve": curve,
               "post_hoc_chosen": {k: v for k, v in chosen.items() if "@" not in k} if setup.post_hoc else None,
               "reused": str(reuse) if reuse is not None else None, "merged": [str(m) for m in merge_with],
               "updates": result.updates,
               "stopped_at": result.updates["target"] if result.updates["target"] < cfg.steps else None,
               "warnings": result.warnings, "code": code, "processes": distributed.world(), **identity,
               "train_seconds": round(result.seconds, 1), "seconds": round(time.time() - t0, 1),
               "pretrained": before, "finetuned": after, **testsets.section(d, before_sets, after_sets)}
    if main:
        atomic_write_text(json.dumps(metrics, indent=2), out / "metrics.json")
        if not keep_checkpoints:  # finished: model.pt holds the kept tower and head; the resume files go
            for f in ("last.pt", "best.pt"):
                (out / "run" / f).unlink(missing_ok=True)
    if registry is not None and main:
        from .results import append_result
        append_result(registry, metrics, run_dir=out)
    return metrics


def _pretrained_test(vlm: VLM, d: Domains, identity: dict) -> dict:
    """The starting model's test metrics; inside a comparison computed once per starting weights, threads, device
    and test data (`budget.cached`), since every final run starts from the same model."""
    from ..budget import CACHE, cached, key_of
    if not os.environ.get(CACHE):
        return evaluate(vlm, d)
    key = key_of("pretrained-test", identity, [s.fingerprint() for s in (d.target_test, d.generic_test, d.text_test)],
                 d.merged_index)
    return cached("pretrained-test", key, lambda: evaluate(vlm, d))


def _reused(run_dir: Path, cfg: TrainConfig, identity: dict, vlm: VLM):
    """A finished run's training, taken for a post-hoc method: refused unless it trained this config (its own seed
    aside) from the same starting weights, threads and device."""
    from ..methods.posthoc import load_tower
    from ..train import TrainResult
    m = json.loads((run_dir / "metrics.json").read_text())
    theirs, ours = with_defaults(m["train"]), asdict(cfg)  # a run made before a field existed trained without it
    if {k: v for k, v in theirs.items() if k != "select"} != {k: v for k, v in ours.items() if k != "select"}:
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        raise ValueError(f"{run_dir} trained another configuration ({diff}): a post-hoc method must start from the "
                         "training it names")
    check_identity(identity, m, f"the reused run {run_dir}")
    vlm.visual.load_state_dict(load_tower(run_dir / "model.pt"))
    log = run_dir / "run" / "log.jsonl"
    history = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    return TrainResult(m["best_step"], None, history, m.get("train_seconds", 0.0), run_dir, m["updates"], m["warnings"])


def run_experiment(preset: str, out_dir: str | Path, smoke: bool = False, seed: int = 0, device: str = "cpu",
                   progress: bool = True, cache_dir: str | Path | None = None, overrides: dict | None = None,
                   test: bool = True, registry: str | Path | None = None, hooks: tuple = (),
                   resume: bool = False, train_seed: int | None = None, world: str = "near",
                   reuse: str | Path | None = None, merge_with: tuple | None = None, tags: dict | None = None,
                   keep_weights: bool = True) -> dict:
    """Run a preset on a built-in world end to end and write out_dir/metrics.json (see `run_setup`).
    overrides: TrainConfig fields to change (a search trial). train_seed, world: see `toy_setup`. merge_with: see
    `run_merged` (a merging preset, Model Stock or a soup, trains the runs it merges unless given them). reuse: see
    `run_setup`. tags: labels echoed into metrics.json and the registry row (e.g. the selection rule a comparison
    chose the settings by)."""
    setup = toy_setup(preset, seed, smoke, device, overrides, cache_dir, progress, train_seed, world)
    setup.source["tags"] = dict(tags or {})
    return run_merged(setup, out_dir, device, progress, test, registry, hooks, resume, reuse, merge_with,
                      keep_weights)


def run_merged(setup: Setup, out_dir: str | Path, device: str = "cpu", progress: bool = True, test: bool = True,
               registry: str | Path | None = None, hooks: tuple = (), resume: bool = False,
               reuse: str | Path | None = None, merge_with: tuple | None = None, keep_weights: bool = True) -> dict:
    """`run_setup`, after the other runs a merge of several runs takes (`setup.ingredients`, `ingredient_overrides`)
    when merge_with is None: each is the same setup with its TrainConfig changed (another fine-tuning seed, or other
    learning rates; no post hoc), trained in out_dir/ingredients/N (a finished one is reused). A comparison
    passes merge_with (the runs it made once for every seed); a setup without ingredients merges nothing."""
    if merge_with is None:
        merge_with = []
        for i, extra in enumerate(ingredient_overrides(setup.ingredients, setup.train)):
            sub = Path(out_dir) / "ingredients" / str(i)
            if not (sub / "metrics.json").exists():
                changed = {k: v for k, v in extra.items() if k != "seed"}
                part = replace(setup, train=replace(setup.train, **extra), post_hoc=None, ingredients=None,
                               overrides={**setup.overrides, **changed},
                               source={k: v for k, v in setup.source.items() if k != "tags"})
                run_setup(part, sub, device, progress, test=False, resume=(sub / "run").exists())
            merge_with.append(sub / "model.pt")
    return run_setup(setup, out_dir, device, progress, test, registry, hooks, resume, reuse, tuple(merge_with),
                     keep_weights)


def cached_run(preset: str, root: str | Path, smoke: bool = False, seed: int = 0, device: str = "cpu",
               registry: str | Path | None = None, progress: bool = True, train_seed: int | None = None):
    """Run a preset once and reuse it: (metrics, fine-tuned VLM, pretrained VLM, world).

    Results live in root/<preset>[-smoke]-s<seed>[-ft<train_seed>]/ (metrics.json, model.pt, run/log.jsonl);
    notebooks share them instead of training the same model again. An interrupted run there is resumed.
    train_seed: a second fine-tuning of the same pretrained model on the same world (see `toy_setup`)."""
    out = Path(root) / f"{preset}{'-smoke' if smoke else ''}-s{seed}{'' if train_seed is None else f'-ft{train_seed}'}"
    if (out / "metrics.json").exists():
        _set_aside_if_stale(out, preset, smoke, seed if train_seed is None else train_seed)
    if not (out / "metrics.json").exists():
        run_experiment(preset, out, smoke=smoke, seed=seed, device=device, progress=progress, registry=registry,
                       resume=(out / "run").exists(), train_seed=train_seed)
    return load_run(out, device, progress)


def _set_aside_if_stale(out: Path, preset: str, smoke: bool, seed: int) -> None:
    """A cached run that trained other settings than the preset now holds (the kit's choices changed since) is moved
    to OUT.stale-N, never deleted, so the chapter trains the preset as it is instead of showing the old run."""
    p = PRESETS[preset]
    want = json.loads(json.dumps(asdict(replace(p.smoke_train if smoke else p.train, seed=seed))))
    have = json.loads((out / "metrics.json").read_text()).get("train", {})
    if have == want:
        return
    n = next(i for i in range(1, 10_000) if not out.with_name(f"{out.name}.stale-{i}").exists())
    out.rename(out.with_name(f"{out.name}.stale-{n}"))
    print(f"{out} trained other settings than {preset} now holds ({', '.join(k for k in want if have.get(k) != want[k])}): "
          f"moved to {out.name}.stale-{n}; training it again")


def load_run(run_dir: str | Path, device: str = "cpu", progress: bool = False):
    """A finished built-in-world run folder -> (metrics with its "history", fine-tuned VLM, pretrained VLM, world).

    Also reads the model.pt of runs made before the file named its model (image tower and head only, commits up
    to 109d7af): their tower goes on top of the run's pretrained toy model."""
    from ..models import load_model
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    world = W.make_world(W.config_from_dict(metrics["world"]))
    pcfg = PretrainConfig(**metrics["pretrain"])
    pretrained = load_pretrained_toy(pcfg.model, device=device, cfg=pcfg, progress=progress)
    ckpt = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    if set(ckpt) == {"visual", "head"}:
        tuned = load_pretrained_toy(pcfg.model, device=device, cfg=pcfg, progress=False)
        tuned.visual.load_state_dict(ckpt["visual"])
    else:
        tuned = load_model(metrics.get("model", pcfg.model), str(run_dir / "model.pt"), device=device)
    log = run_dir / "run" / "log.jsonl"
    metrics["history"] = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    return metrics, tuned, pretrained, world


def chapter_rows(presets: list[str], root: str | Path, smoke: bool = False, seed: int = 0, device: str = "cpu",
                 comparison: str | Path | None = None, progress: bool = True) -> tuple[list[dict], dict[str, list]]:
    """The registry rows a chapter compares (for `results.summarise`) and the training histories it can plot.

    comparison=None: each preset runs here once (or is reused) through `cached_run` with seed `seed`.
    comparison=<registry file>: every non-smoke row of those presets in that file (all its seeds); nothing
    trains and no histories come back. Teaching mode reads the kit's committed comparison this way
    (results/toy-comparison-cpu-v2.jsonl), because training every method on 2 CPU cores takes hours."""
    from .registry import load_results, row_of
    unknown = set(presets) - set(PRESETS)
    if unknown:
        raise ValueError(f"unknown presets {sorted(unknown)}; choose from {sorted(PRESETS)}")
    if comparison is not None:
        rows = [r for r in load_results(comparison, smoke=False) if r["method"] in presets]
        missing = [p for p in presets if p not in {r["method"] for r in rows}]
        if missing:
            raise ValueError(f"{comparison} has no finished rows for {missing}: run them with `python -m infusing_kit "
                             f"experiment --preset NAME --out DIR --registry {comparison}`, or train here with "
                             "comparison=None")
        return rows, {}
    rows, histories = [], {}
    for p in presets:
        m, *_ = cached_run(p, root, smoke=smoke, seed=seed, device=device, registry=Path(root) / "results.jsonl",
                           progress=progress)
        rows.append(row_of(m, method=p))
        histories[p] = m["history"]
    return rows, histories
