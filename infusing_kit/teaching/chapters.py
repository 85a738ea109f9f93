"""What a chapter needs from a run, on the built-in world or on your own model and data.

Every chapter that trains starts with the same call; `CONFIG` is its parameter:

    run = chapters.run("toy-naive", RESULTS_DIR, config=CONFIG, smoke=SMOKE, seed=SEED, device=DEVICE)
    run.metrics, run.tuned, run.pretrained, run.data     # data: experiment.Domains (target_*, generic_*, text_test)

A chapter that compares methods reads them from one world's current comparison (results/current.json), or trains
them here in SMOKE mode; with a study file, it trains the study's methods that play the presets' parts here (or
reads them from a registry of that study's comparison):

    METHODS = chapters.methods_of(PRESETS, CONFIG)      # their names (a study that lacks one is refused, saying so)
    got = chapters.compared(PRESETS, RESULTS_DIR, smoke=SMOKE, seed=SEED, comparison=COMPARISON, config=CONFIG)
    got.rows, got.histories, got.source, got.trials("toy-l2sp")

config=None: the preset on the built-in world (`experiment.cached_run`). config=a study file (its `[study]`
names the methods; `export-world` writes one) or an experiment file (one method): the method of that file that
plays the preset's part (`method_of`), on its model and data. Runs live in `root` and are reused; an interrupted
one resumes. The figures a chapter draws take splits (`data.Split` or `data.FileSplit`) through `take`, so the
same cells draw the toy world's arrays and your image files.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..datasets.containers import Domains
from ..protocol.experiment import cached_run, chapter_rows
from ..models import VLM, embed_images, load_model
from ..world import domains as world_domains


@dataclass
class ChapterRun:
    """One finished run: its metrics.json (with "history", the training log), the kept and the pretrained model,
    and the data it ran on. Unpacks as (metrics, tuned, pretrained, data)."""
    metrics: dict
    tuned: VLM
    pretrained: VLM
    data: Domains

    def __iter__(self):
        return iter((self.metrics, self.tuned, self.pretrained, self.data))


def is_study(config: str | Path) -> bool:
    from ..protocol.config import read_toml
    return "study" in read_toml(config)


def method_of(method: str, config: str | Path | None) -> str:
    """The name of the method that plays `method`'s part in `config`: the same name where the file has it, else
    the study's baseline for the built-in baseline ("toy-naive"); an experiment file has one method, its `name`."""
    if config is None:
        return method
    from ..protocol.config import load_config
    if not is_study(config):
        return load_config(config)["name"]
    from ..protocol.study import load_study
    study = load_study(config)
    name = _plays(method, study)
    if name is None:
        raise ValueError(f"{config} has no method {method!r} (its methods: {sorted(study.methods)}); set the chapter's "
                         "parameter that names it to one of them")
    return name


def _plays(method: str, study) -> str | None:
    """The study's method that plays `method`'s part (method_of), None where it has none."""
    from ..protocol.presets import PRESETS
    if method in study.methods:
        return method
    if method == "toy-naive" or (method in PRESETS and PRESETS[method].family == "baseline"):
        return study.protocol.baseline
    return None


def lacks(presets: list[str], config: str | Path | None) -> list[str]:
    """The presets that `config` has no method for (`method_of`); none on the built-in world. A chapter skips the
    part that needs them, saying so."""
    if config is None or not is_study(config):  # (an experiment file: `methods_of` refuses it)
        return []
    from ..protocol.study import load_study
    study = load_study(config)
    return [p for p in presets if _plays(p, study) is None]


def methods_of(presets: list[str], config: str | Path | None) -> list[str]:
    """The names of the methods that play `presets`' parts (`method_of`), in order: the presets themselves on the
    built-in world. A chapter that compares methods needs a study file: an experiment file (one method), or a study
    without one of them, is refused with what to add to it."""
    if config is None:
        return list(presets)
    if not is_study(config):
        raise ValueError(f"{config} is an experiment file (one method); this chapter compares {presets}: set CONFIG to "
                         "a study file (docs/your-data.md; `export-world` writes one)")
    missing = lacks(presets, config)
    if missing:
        tables = "".join(f'\n  [study.method.{p}]\n  preset = "{p}"' for p in missing)
        raise ValueError(f"{config} has no method for {missing}, which this chapter compares; add them to its "
                         f"[study] methods list and their tables:{tables}")
    return [method_of(p, config) for p in presets]


def train_config(method: str, config: str | Path | None = None, smoke: bool = False):
    """The TrainConfig that `method` trains with: the preset's (its SMOKE schedule with smoke) on the built-in world;
    on a study file, that of the study's method that plays its part (its own schedule, whatever smoke says)."""
    if config is None:
        from ..protocol.presets import PRESETS
        return PRESETS[method].smoke_train if smoke else PRESETS[method].train
    if not is_study(config):
        from ..protocol.config import load_config, train_config as config_train
        return config_train(load_config(config))
    from ..protocol.study import load_study
    return load_study(config).methods[method_of(method, config)].train


def run(method: str, root: str | Path, config: str | Path | None = None, smoke: bool = False, seed: int = 0,
        device: str = "cpu", train_seed: int | None = None, progress: bool = True,
        registry: str | Path | None = None) -> ChapterRun:
    """Run `method` once into root and reuse it (module docstring). train_seed: a second fine-tuning of the same
    model on the same data (built in: see `toy_setup`; a file: the run's seed is train_seed). registry: the
    results file the run is added to (default root/results.jsonl)."""
    registry = Path(root) / "results.jsonl" if registry is None else registry
    if config is None:
        m, tuned, pretrained, w = cached_run(method, root, smoke=smoke, seed=seed, device=device, registry=registry,
                                             progress=progress, train_seed=train_seed)
        return ChapterRun(m, tuned, pretrained, world_domains(w))
    from ..protocol.config import load_config, setup_from_config
    config = Path(config)
    name, seed = method_of(method, config), seed if train_seed is None else train_seed
    tag = hashlib.sha256(config.read_bytes()).hexdigest()[:8]  # a changed file makes new runs
    out = Path(root) / f"{config.stem}-{name}-s{seed}-{tag}"
    if not (out / "metrics.json").exists():
        resume = (out / "run").exists()
        if is_study(config):
            from ..protocol.study import load_study
            load_study(config).runner.run(name, out, seed=seed, registry=registry, resume=resume, device=device,
                                          progress=progress)
        else:
            from ..protocol.experiment import run_merged
            setup = setup_from_config(dict(load_config(config), seed=seed), device=device, progress=progress)
            run_merged(setup, out, device=device, progress=progress, registry=registry, resume=resume)
    return load_run(out, device, progress)


def load_run(run_dir: str | Path, device: str = "cpu", progress: bool = False) -> ChapterRun:
    """A finished run folder, of the built-in world or of a config file, as a ChapterRun (its data opened again from
    the config the run recorded)."""
    from ..protocol import experiment
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    if "world" in metrics:
        m, tuned, pretrained, w = experiment.load_run(run_dir, device, progress)
        return ChapterRun(m, tuned, pretrained, world_domains(w))
    from ..protocol.config import setup_from_config
    cfg = metrics["config"]
    setup = setup_from_config(cfg, device=device, progress=progress, method=cfg.get("method", {}), name=metrics["preset"])
    log = run_dir / "run" / "log.jsonl"
    metrics["history"] = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return ChapterRun(metrics, load_model(metrics["model"], str(run_dir / "model.pt"), device=device), setup.model(),
                      setup.domains)


def first(split, n: int) -> torch.Tensor:
    """The first n images of a split (all when it has fewer), uint8 (n, 3, H, W)."""
    return split.take(np.arange(min(n, len(split))))


def queries(split, n: int = 4) -> np.ndarray:
    """n query indices spread evenly over a split."""
    return np.arange(0, len(split), max(1, len(split) // n))[:n]


def neighbours(model: VLM, split, query: np.ndarray, k: int = 5) -> dict:
    """The top-k neighbours of the split's items `query` among the whole split (each query's own item left out).
    Returns what `figures.gallery` draws: query and neighbour images, the neighbours' grid and which are relevant
    (same label)."""
    from ..metrics import knn_search
    emb = embed_images(model, split, progress=False)
    _, nn = knn_search(emb[query], emb, k=k + 1)
    nn = np.stack([[j for j in row if j != q][:k] for row, q in zip(nn, query)])
    return {"query_images": split.take(query), "index_images": split.take(nn.reshape(-1)),
            "neighbours": np.arange(nn.size).reshape(nn.shape), "relevant": split.labels[nn] == split.labels[query][:, None]}


def gallery(model: VLM, split, query: np.ndarray, k: int = 5, title: str = ""):
    """A retrieval gallery of `model` on `split` (`neighbours`, drawn by `figures.gallery`)."""
    from . import figures
    fig = figures.gallery(**neighbours(model, split, query, k))
    fig.suptitle(title, y=1.02)
    return fig


def figure_path(figures_dir: str | Path, name: str, smoke: bool, config: str | Path | None) -> str:
    """Where a chapter saves a figure: name, '-smoke' in smoke mode and the config's stem on your data (so the
    built-in world's figures are never overwritten)."""
    return f"{figures_dir}/{name}{'-smoke' if smoke else ''}{'' if config is None else '-' + Path(config).stem}"


@dataclass
class Compared:
    """A chapter's methods on the test sets: registry rows (`results.summarise`, `results.paired_table`), the
    training histories of runs trained here (none when read from a registry), where the rows came from (printed by
    the chapter), and the search trials behind the chosen settings (validation only)."""
    rows: list[dict]
    histories: dict
    source: str
    trials_path: Path | None

    def sweeps(self, fields: dict[str, str]):
        """The strength sweeps behind the chosen settings, one panel per method (fields: {method: the field its
        search varied}): (the figure, or None when a method has no trials here; {method: its trials by field})."""
        import matplotlib.pyplot as plt

        from . import figures
        trials = {m: sorted(self.trials(m), key=lambda t: t["params"][f]) for m, f in fields.items()}
        if not all(trials.values()):
            return None, trials
        fig, axes = plt.subplots(1, len(fields), figsize=(5 * len(fields), 3.4), squeeze=False)
        for ax, (m, f) in zip(axes[0], fields.items()):
            figures.sweep(trials[m], f, ax=ax)
        return fig, trials

    def trials(self, method: str) -> list[dict]:
        """The complete search trials of `method` (empty when the rows were trained here)."""
        from ..protocol.results import load_trials
        if self.trials_path is None:
            return []
        return [t for t in load_trials(self.trials_path, method) if t.get("state", "complete") == "complete"]


def compared(presets: list[str], root: str | Path, smoke: bool = False, seed: int = 0, device: str = "cpu",
             comparison: str | Path | None = "current", trials: str | Path | None = "current", world: str = "near",
             progress: bool = True, config: str | Path | None = None) -> Compared:
    """The rows a chapter compares. SMOKE, or comparison=None: each preset trained here once (seed `seed`, cached
    in `root`). Otherwise a comparison registry's rows of those presets (each method's main choice, on the seeds
    every one of them ran): "current" is `world`'s current comparison (results/current.json names it); a path is
    that registry. A world without a current comparison trains here too (a one-seed table; `source` says so): a
    chapter never shows another world's numbers. trials="current": the world's current search trials (validation
    only, so shown beside runs trained here as well); a path: that trials file; None: no sweeps.

    config=a study file: the study's methods that play the presets' parts (`methods_of`; rows and histories under
    their names). comparison "current" or None, or smoke: each trained here once by `run` (the study's schedule,
    seed `seed`), the rows of those runs; a path: that registry's rows of them (`compare --config STUDY --out DIR`
    writes DIR/results.jsonl), on the seeds all of them ran. trials: a path only (the built-in world's searches
    are not the study's)."""
    from ..protocol.results import RESULTS, current
    if config is not None:
        return _compared_on(config, presets, root, smoke, seed, device, comparison, trials, progress)
    what = "the comparison registry"
    if trials == "current":  # the searches are validation only: shown beside runs trained here too
        trials = current(world, "trials")
    trials = Path(trials) if trials is not None else None
    if not smoke and comparison == "current":
        comparison, what = current(world, "comparison"), f"the {world} world's current comparison"
    if smoke or comparison is None:
        rows, histories = chapter_rows(presets, root, smoke=smoke, seed=seed, device=device, progress=progress)
        return Compared(rows, histories, f"trained here ({'SMOKE schedule, ' if smoke else ''}seed {seed})", trials)
    comparison = Path(comparison)
    rows, histories = chapter_rows(presets, root, comparison=comparison)
    name = comparison.name if comparison.parent.resolve() == RESULTS.resolve() else str(comparison)
    return _on_shared_seeds(rows, presets, comparison, f"{what} {name}", trials)


def _on_shared_seeds(rows: list[dict], methods: list[str], comparison: Path, what: str, trials) -> Compared:
    """A registry's rows of `methods`: each method's main choice, on the seeds every one of them ran."""
    from ..protocol.results import label
    rows = [r for r in rows if label(r) == r["method"]]  # the main choices (a rule's or search seed's variant: 09)
    seeds = set.intersection(*({r["seed"] for r in rows if r["method"] == p} for p in methods))
    if not seeds:
        raise ValueError(f"{comparison}: no seed on which all of {methods} ran; compare them on shared seeds")
    rows = [r for r in rows if r["seed"] in seeds]  # every method on the same seeds: a fair table
    return Compared(rows, {}, f"{what} (seeds {_span(sorted(seeds))}, those every method here ran: {len(rows)} runs)",
                    trials)


def _compared_on(config, presets, root, smoke, seed, device, comparison, trials, progress) -> Compared:
    """`compared` on a study file (its docstring)."""
    from ..protocol.registry import load_results, row_of
    names = methods_of(presets, config)
    trials = None if trials in (None, "current") else Path(trials)
    if smoke or comparison in (None, "current"):
        rows, histories = [], {}
        for p, name in zip(presets, names):
            r = run(p, root, config=config, smoke=smoke, seed=seed, device=device, progress=progress)
            rows.append(row_of(r.metrics, method=name))
            histories[name] = r.metrics["history"]
        return Compared(rows, histories, f"trained here on {Path(config).name} (its schedule, seed {seed})", trials)
    comparison = Path(comparison)
    rows = [r for r in load_results(comparison) if r["method"] in names and r.get("finetuned")]
    missing = [n for n in names if n not in {r["method"] for r in rows}]
    if missing:
        raise ValueError(f"{comparison} has no finished rows of {missing}: run `python -m infusing_kit compare "
                         f"--config {config} --out DIR` and set COMPARISON to DIR/results.jsonl, or COMPARISON = None "
                         "to train them here")
    return _on_shared_seeds(rows, names, comparison, f"the comparison registry {comparison}", trials)


def _span(seeds: list[int]) -> str:
    return f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 1 else \
        ", ".join(map(str, seeds))
