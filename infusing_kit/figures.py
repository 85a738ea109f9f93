"""Figures shared by the notebooks and `python -m infusing_kit report` (matplotlib; colour-blind-safe
colours fixed per method in results.COLOURS; PNG and SVG).

- `figure1(summary)`: the paper's Figure 1 style, deltas vs the pretrained model on three axes.
- `tradeoff(summary)`: fine-grained gain vs forgetting, one point per method with error bars over seeds.
- `curves(history)`: validation scores over training steps (forgetting as it happens).
- `sweep(trials, field)`: validation scores against a searched strength, from exported search trials.
- `drift(drifts)`: per-block weight distance and feature CKA against the pretrained tower (`drift.layer_drift`).
- `agreement(histories)`: teacher agreement on generic images over training.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .metrics import FINE, GENERIC
from .results import AXES, COLOURS


def _colour(method: str) -> str:
    return COLOURS.get(method, "#444444")


def save(fig, path_stem: str | Path) -> list[Path]:
    """Write path_stem.png (150 dpi) and path_stem.svg; returns the paths.

    Byte-identical for the same figure: no creation date in the metadata and a fixed salt for the SVG's
    element ids (matplotlib draws random ones otherwise), so redrawing a figure leaves a checkout clean."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    with plt.rc_context({"svg.hashsalt": "infusing_kit"}):
        fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(paths[1], bbox_inches="tight", metadata={"Date": None, "Creator": None})
    return paths


def seeds_label(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def figure1(summary: list[dict], methods: tuple[str, ...] = ("toy-naive", "toy-paper"), ax=None):
    """Grouped bars: change vs the pretrained model (x100) per axis, mean +- std over seeds."""
    rows = [s for s in summary if s["method"] in methods]
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(AXES))
    width = 0.8 / max(1, len(rows))
    for i, s in enumerate(rows):
        means = [100 * s[f"{a}_mean"] for a in AXES]
        stds = [100 * s[f"{a}_std"] for a in AXES]
        bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                      color=_colour(s["method"]), label=f"{s['method']} ({seeds_label(s['seeds'])})")
        ax.bar_label(bars, labels=[f"{m:+.1f}" for m in means], fontsize=8, padding=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, ["in-domain\nfine-grained mAP@20", "out-of-domain\ngeneric mAP@20", "out-of-domain\nimage->text R@1"])
    ax.set_ylabel("change vs pretrained (points, x100)")
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("Fine-tuning the image tower: gain and forgetting (test sets)")
    return ax.figure


def tradeoff(summary: list[dict], forgetting: str = "i2t", ax=None):
    """Fine-grained gain (y) vs change on a retention axis (x); up and right is better."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.4))
    for s in summary:
        ax.errorbar(100 * s[f"{forgetting}_mean"], 100 * s["fine_mean"], xerr=100 * s[f"{forgetting}_std"],
                    yerr=100 * s["fine_std"], fmt="o", ms=7, capsize=3, color=_colour(s["method"]),
                    label=s["method"].removeprefix("toy-"))
    ax.axvline(0, color="black", lw=0.6, ls=":")
    ax.set_xlabel(f"change in {AXES[forgetting][2]} vs pretrained (points)")
    ax.set_ylabel("gain in fine-grained mAP@20 (points)")
    ax.set_title("Trade-off: each method at its validation-chosen strength")
    ax.legend(fontsize=7, ncol=2, frameon=False, loc="best")
    return ax.figure


def sweep(trials: list[dict], field: str, ax=None, log: bool = True, highlight: dict | None = None,
          chosen: dict | None = None):
    """Validation mAP@20 (fine-grained and generic) against one searched strength, one point per search trial;
    `highlight` (a trial) is ringed and `chosen` (a trial) marked by a vertical line."""
    trials = sorted(trials, key=lambda t: t["params"][field])
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.4))
    x = [t["params"][field] for t in trials]
    method = trials[0]["method"] if trials else ""
    for key, marker, label in ((FINE, "o", "fine-grained val"), (GENERIC, "s", "generic val")):
        ax.plot(x, [t["val"][key] for t in trials], marker=marker, ls="-" if key.startswith("fine") else "--",
                color=_colour(method), label=label)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(f"{field} (searched)")
    ax.set_ylabel("validation mAP@20")
    ax.set_ylim(0, 1)
    distinct = len(set(x))
    ax.set_title(f"{method.removeprefix('toy-')}: strength sweep ({len(trials)} search trials"
                 + (f", {distinct} distinct)" if distinct < len(trials) else ")"), fontsize=10)
    if highlight is not None:
        h = highlight["params"][field]
        ax.scatter([h, h], [highlight["val"][FINE], highlight["val"][GENERIC]], s=160, facecolors="none",
                   edgecolors="black", lw=1.5, label=f"trial at slider ({h:.3g})")
    if chosen is not None:
        ax.axvline(chosen["params"][field], color="#009E73", ls="--", label=f"chosen ({chosen['params'][field]:.3g})")
    ax.tick_params(labelsize=8)
    ax.legend(frameon=False, fontsize=8)
    return ax.figure


def run_points(points: dict[str, np.ndarray], x: str, y: str, ax=None):
    """Every run as a small dot and each method's mean as a large one: points = {method: (n_runs, 2) deltas on
    the results.AXES keys x and y} (`explorer.trade_off_points`)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    for m, p in points.items():
        c = _colour(m)
        ax.scatter(100 * p[:, 0], 100 * p[:, 1], s=14, alpha=0.45, color=c)
        ax.scatter(100 * p[:, 0].mean(), 100 * p[:, 1].mean(), s=80, color=c, edgecolor="black",
                   label=f"{m.removeprefix('toy-')} ({len(p)})")
    ax.set_xlabel(f"change in {AXES[x][2]} (points)")
    ax.set_ylabel(f"change in {AXES[y][2]} (points)")
    ax.axhline(0, color="black", lw=0.5, ls=":"), ax.axvline(0, color="black", lw=0.5, ls=":")
    if points:
        ax.legend(fontsize=7, frameon=False, loc="best")
    return ax.figure


def curves(history: list[dict], label: str = "", axes=None):
    """Validation fine-grained and generic mAP@20 against target steps."""
    rows = [h for h in history if f"val/{FINE}" in h]
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [h["target_step"] for h in rows]
    for ax, key, title in zip(axes, (f"val/{FINE}", f"val/{GENERIC}"),
                              ("fine-grained validation mAP@20", "generic validation mAP@20")):
        ax.plot(steps, [h[key] for h in rows], marker="o", label=label or None)
        ax.set_xlabel("target steps")
        ax.set_title(title)
        ax.set_ylim(0, 1)
    if label:
        axes[0].legend(frameon=False)
    return axes[0].figure


def drift(drifts: dict[str, dict], axes=None):
    """Where forgetting happens: per part of the tower, the relative weight distance from the pretrained weights
    (left) and the linear CKA of each block's output with the pretrained one (right; solid: generic images,
    dashed: fine-grained). drifts: {method: drift.layer_drift(...)}."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    styles = ("-", "--", ":")
    for method, d in drifts.items():
        c = _colour(method)
        parts = d["groups"]
        axes[0].plot(range(len(parts)), [d["weight"][g] for g in parts], marker="o", color=c,
                     label=method.removeprefix("toy-"))
        for (domain, cka), ls in zip(d["cka"].items(), styles):
            names = list(cka)
            axes[1].plot([parts.index(n) for n in names], list(cka.values()), marker="o", ls=ls, color=c,
                         label=f"{method.removeprefix('toy-')} ({domain})")
    parts = next(iter(drifts.values()))["groups"]
    for ax in axes:
        ax.set_xticks(range(len(parts)), parts, rotation=30, fontsize=8)
    axes[0].set_ylabel("||theta - theta0|| / ||theta0||")
    axes[0].set_title("weight distance from the pretrained tower", fontsize=10)
    axes[1].set_ylabel("linear CKA vs pretrained")
    axes[1].set_title("features of each block vs the pretrained ones", fontsize=10)
    axes[1].set_ylim(0, 1.02)
    axes[0].legend(frameon=False, fontsize=8)
    axes[1].legend(frameon=False, fontsize=7)
    return axes[0].figure


def agreement(histories: dict[str, list[dict]], ax=None):
    """Teacher agreement over training: mean cosine between each generic validation image's embedding and the
    pretrained model's (`val/generic_agreement` in a run's history), against target steps."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.4))
    for method, history in histories.items():
        rows = [h for h in history if "val/generic_agreement" in h]
        if not rows:
            raise ValueError(f"the history of {method} logs no val/generic_agreement (a run from before the kit "
                             "logged it): delete its folder to train it again")
        ax.plot([h["target_step"] for h in rows], [h["val/generic_agreement"] for h in rows], marker="o",
                color=_colour(method), label=method.removeprefix("toy-"))
    ax.set_xlabel("target steps")
    ax.set_ylabel("mean cos(student, teacher)")
    ax.set_title("agreement with the pretrained model on generic images", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    return ax.figure


def show_images(images, titles=None, ncols: int = 8, scale: float = 1.1):
    """A grid of uint8 (N, 3, H, W) images."""
    n = len(images)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * scale, nrows * scale * (1.25 if titles else 1)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            if titles:
                ax.set_title(titles[i], fontsize=6)
    return fig


def gallery(query_images, index_images, neighbours: np.ndarray, relevant: np.ndarray, row_labels=None):
    """Retrieval gallery: each row a query then its top-k; a green frame marks a correct neighbour, red a wrong one."""
    nq, k = neighbours.shape
    fig, axes = plt.subplots(nq, k + 1, figsize=((k + 1) * 1.0, nq * 1.05), squeeze=False)
    for r in range(nq):
        axes[r, 0].imshow(query_images[r].permute(1, 2, 0).numpy(), interpolation="nearest")
        axes[r, 0].set_ylabel(row_labels[r] if row_labels else "", fontsize=7)
        for c in range(k):
            ax = axes[r, c + 1]
            ax.imshow(index_images[neighbours[r, c]].permute(1, 2, 0).numpy(), interpolation="nearest")
            for side in ax.spines.values():
                side.set_edgecolor("#009E73" if relevant[r, c] else "#D55E00")
                side.set_linewidth(2.5)
        for ax in axes[r]:
            ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].set_title("query", fontsize=8)
    for c in range(k):
        axes[0, c + 1].set_title(f"#{c + 1}", fontsize=8)
    return fig


def umap_scatter(emb_sets: dict[str, np.ndarray], seed: int = 0, ax=None, title: str = "", groups=None,
                 group_names=None):
    """UMAP (cosine) of several embedding sets, one colour each; fitted on their union. groups: with one set, a
    group id per point instead (e.g. the generic images' shape): the 8 largest groups get a colour each (named by
    group_names[id] in the legend), the others grey, so one sees whether the groups stay apart."""
    import umap
    names = list(emb_sets)
    x = np.concatenate([emb_sets[n] for n in names])
    xy = umap.UMAP(n_neighbors=15, min_dist=0.2, metric="cosine", random_state=seed).fit_transform(x)
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.2))
    palette = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]
    if groups is not None:
        if len(names) != 1 or len(groups) != len(x):
            raise ValueError("groups colours the points of one embedding set: one group id per point")
        groups = np.asarray(groups)
        ids, counts = np.unique(groups, return_counts=True)
        top = ids[np.argsort(-counts, kind="stable")[:len(palette)]]
        rest = ~np.isin(groups, top)
        ax.scatter(xy[rest, 0], xy[rest, 1], s=4, alpha=0.3, color="#BBBBBB", label="other" if rest.any() else None)
        for i, g in enumerate(sorted(top)):
            at = groups == g
            ax.scatter(xy[at, 0], xy[at, 1], s=5, alpha=0.7, color=palette[i],
                       label=str(group_names[g]) if group_names is not None else str(g))
        names = []
    start = 0
    for i, n in enumerate(names):
        m = len(emb_sets[n])
        ax.scatter(xy[start:start + m, 0], xy[start:start + m, 1], s=4, alpha=0.6, color=palette[i % 4], label=n)
        start += m
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=7, frameon=False)
    return ax.figure
