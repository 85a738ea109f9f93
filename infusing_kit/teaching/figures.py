"""Figures shared by the notebooks and `python -m infusing_kit report` (matplotlib; PNG and SVG).

One style everywhere: `STYLE` gives each method family one colour (colour-blind safe, no yellow on white) and a row
of markers; `style(name)` maps any method, preset or label to its family's colour and its own marker, and every
function here that draws methods takes its colours from it. Legends sit outside the data, value axes start at 0 or
are marked as cut, trade-off plots carry a "better" arrow, and a colour scale comes with a labelled colour bar.

figure1 (the paper's Figure 1 style), tradeoff (gain vs forgetting per method), run_points (every run, the
explorer's trade-off), curves (validation over training), sweep (validation vs a searched strength), drift
(per-block weight distance and CKA), agreement (teacher agreement over training); scored (a colour scale with
its labelled colour bar) and legend_outside, for notebooks' own plots; show_images, gallery, umap_scatter (pictures).
"""
from __future__ import annotations

import zlib
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.transforms import offset_copy

from ..metrics import FINE, GENERIC
from ..protocol.presets import PRESETS
from ..protocol.results import AXES

# The one style table: family -> (colour, markers). Okabe-Ito's colour-blind-safe colours without its yellow
# (unreadable on white), and Tol's wine and indigo for the two families Okabe-Ito has no colour left for. A family's
# first marker is its first member's (presets.PRESETS order), the next members take the next markers of its row.
# "paper" is the paper's combination and its ablations; "other" takes any name the kit does not know.
STYLE = {
    "pretrained": ("#000000", ("*",)),
    "baseline": ("#D55E00", ("o", "s")),
    "paper": ("#0072B2", ("D", "d", "p")),
    "weight space": ("#009E73", ("s", "o", "^", "v")),
    "function space": ("#CC79A7", ("^", "o", "s", "D", "v", "P", "X", "<", ">")),
    "data": ("#E69F00", ("v", "o", "s", "^")),
    "optimisation": ("#56B4E9", ("P", "o", "s", "^", "D")),
    "step rule": ("#882255", ("X", "o", "s", "^", "D")),
    "post hoc": ("#332288", ("h", "o", "s", "^", "D", "v")),
    "other": ("#777777", ("p", "o", "s", "^", "D", "v", "P", "X")),
}
HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "++")  # bars of one family's members (figure1), by member index
GROUPS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#000000")  # not methods
ALIASES = {"naive": "toy-naive", "combination": "toy-paper", "paper": "toy-paper", "zero-shot": "pretrained",
           "toy-two-seed-merge": "toy-model-stock"}  # labels the notebooks use, and a former preset name


def _name(name: str) -> str:
    """The preset a label names: summarise's tags ("toy-paper [constraint rule]") and the "toy-" prefix dropped."""
    name = name.split(" [")[0].strip()
    name = ALIASES.get(name, name)
    return f"toy-{name}" if name not in PRESETS and f"toy-{name}" in PRESETS else name


def family(name: str) -> str:
    """The style family of a method or preset name: presets.Preset.family, with the paper's combination and its
    ablations apart ("paper"), "pretrained", and "other" for names the kit does not know."""
    name = _name(name)
    if name == "pretrained":
        return "pretrained"
    if name not in PRESETS:
        return "other"
    return "paper" if "toy-paper" in (name, PRESETS[name].ablation_of) else PRESETS[name].family


def _member(name: str) -> tuple[str, int]:
    """(family, index of the method among its family's presets); an unknown name gets a stable index from its text."""
    fam, name = family(name), _name(name)
    members = [m for m in PRESETS if family(m) == fam]
    return fam, members.index(name) if name in members else zlib.crc32(name.encode())


def style(name: str) -> dict:
    """{"color", "marker"} of a method, preset or notebook label ("naive", "l2sp", "combination"): its family's
    colour from `STYLE` and its own marker from the family's row. Deterministic for any name."""
    fam, i = _member(name)
    colour, markers = STYLE.get(fam, STYLE["other"])  # (a family presets.py added but this table not yet)
    return {"color": colour, "marker": markers[i % len(markers)]}


def legend_outside(ax, where: str = "auto", **kw):
    """A legend outside the data (notebooks' own plots too): right of the axes, or below them ("below", or "auto"
    when another panel of the figure sits to the right), clear of the tick labels and the axis label."""
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    kw = {"frameon": False, "fontsize": 8, **kw}
    spec = ax.get_subplotspec()
    if where == "auto":
        where = "right" if spec is None or spec.colspan.stop == spec.get_gridspec().ncols else "below"
    if where == "right":
        return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, **kw)
    fig = ax.figure
    drop = (ax.get_window_extent().y0 - ax.get_tightbbox().y0) * 72 / fig.dpi + 4  # points under the axes
    return ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), borderaxespad=0,
                     bbox_transform=offset_copy(ax.transAxes, fig=fig, y=-drop, units="points"), **kw)


def _better(ax, text: str = "better"):
    """An arrow pointing to the better corner of a trade-off plot (up and right: more gain, less forgetting)."""
    ax.annotate(text, xy=(0.98, 0.98), xytext=(0.86, 0.84), xycoords="axes fraction", textcoords="axes fraction",
                ha="center", va="center", fontsize=8, color="0.3", zorder=0.5,
                arrowprops=dict(arrowstyle="->", color="0.3", lw=1.2))


def _from_zero(ax, squash: float = 0.5):
    """The y axis starts at 0, unless the data all lie above `squash` of its top: then it stays cut and says so (a
    // break on the spine, "(axis cut)" in its label), so a reader does not read heights as ratios."""
    low, high = ax.get_ylim()
    if low <= 0:
        return
    if low <= squash * high:
        ax.set_ylim(bottom=0)
        return
    for y in (0.0, 0.03):
        ax.add_artist(Line2D([-0.015, 0.015], [y - 0.012, y + 0.012], transform=ax.transAxes, color="black",
                             lw=1, clip_on=False, gid="axis-cut"))
    ax.set_ylabel(f"{ax.get_ylabel()} (axis cut)")


def _pretrained(ax):
    """The pretrained model, the origin of every change: drawn at (0, 0), so both axes show their zero."""
    s = style("pretrained")
    ax.scatter([0], [0], s=110, color=s["color"], marker=s["marker"], zorder=3, label="pretrained (0, 0)")
    ax.axhline(0, color="black", lw=0.5, ls=":"), ax.axvline(0, color="black", lw=0.5, ls=":")


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
    """Grouped bars: change vs the pretrained model per axis in percentage points, mean +- std over seeds. Bars
    take their family's colour; further members of a family are hatched."""
    rows = [s for s in summary if s["method"] in methods]
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(AXES))
    width = 0.8 / max(1, len(rows))
    for i, s in enumerate(rows):
        means = [100 * s[f"{a}_mean"] for a in AXES]
        stds = [100 * s[f"{a}_std"] for a in AXES]
        hatch = HATCHES[_member(s["method"])[1] % len(HATCHES)]
        bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=stds, capsize=3, hatch=hatch or None,
                      color=style(s["method"])["color"], edgecolor="white" if hatch else None,
                      label=f"{s['method']} ({seeds_label(s['seeds'])})")
        ax.bar_label(bars, labels=[f"{m:+.1f}" for m in means], fontsize=8, padding=2)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, ["in-domain\nfine-grained mAP@20", "out-of-domain\ngeneric mAP@20", "out-of-domain\nimage->text R@1"])
    ax.set_ylabel("change vs pretrained (percentage points)")
    ax.set_title("Fine-tuning the image tower: gain and forgetting (test sets)")
    if rows:
        legend_outside(ax)
    return ax.figure


def tradeoff(summary: list[dict], forgetting: str = "i2t", ax=None, legend: bool = True):
    """Fine-grained gain (y) vs change on a retention axis (x), in percentage points; up and right is better (the
    arrow). The pretrained model sits at (0, 0). Tagged rows ("toy-paper [constraint rule]") get hollow markers."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.4))
    _pretrained(ax)
    for s in summary:
        st = style(s["method"])
        ax.errorbar(100 * s[f"{forgetting}_mean"], 100 * s["fine_mean"], xerr=100 * s[f"{forgetting}_std"],
                    yerr=100 * s["fine_std"], fmt=st["marker"], ms=7, capsize=3, color=st["color"],
                    mfc="white" if " [" in s["method"] else st["color"], label=s["method"].removeprefix("toy-"))
    _better(ax)
    ax.set_xlabel(f"change in {AXES[forgetting][2]} vs pretrained (points)")
    ax.set_ylabel("gain in fine-grained mAP@20 (points)")
    ax.set_title("Trade-off: each method at its validation-chosen strength")
    if legend:
        legend_outside(ax, fontsize=7, ncol=2 if len(summary) > 12 else 1)
    return ax.figure


def sweep(trials: list[dict], field: str, ax=None, log: bool | None = None, highlight: dict | None = None,
          chosen: dict | None = None):
    """Validation mAP@20 (fine-grained: solid, filled; generic: dashed, hollow) against one searched strength, one
    point per trial, in the method's colour and marker; `highlight` (a trial) ringed, `chosen` (a trial) a vertical
    line; the legend below. log=None: the preset's search scale, else log where the values span two decades."""
    trials = sorted(trials, key=lambda t: t["params"][field])
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.4))
    x = [t["params"][field] for t in trials]
    method = trials[0]["method"] if trials else ""
    st = style(method)
    for key, ls, label in ((FINE, "-", "fine-grained val"), (GENERIC, "--", "generic val")):
        ax.plot(x, [t["val"][key] for t in trials], marker=st["marker"], ls=ls, color=st["color"],
                mfc=st["color"] if key == FINE else "white", label=label)
    scale = next((s[3] for s in PRESETS[method].search if s[0] == field), None) if method in PRESETS else None
    log = log if log is not None else scale if scale is not None else bool(x) and min(x) > 0 and max(x) >= 100 * min(x)
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
        ax.axvline(chosen["params"][field], color="black", ls=":", label=f"chosen ({chosen['params'][field]:.3g})")
    ax.tick_params(labelsize=8)
    legend_outside(ax, where="below", ncol=2)
    return ax.figure


def run_points(points: dict[str, np.ndarray], x: str, y: str, ax=None):
    """Every run as a small dot and each method's mean as a large one (its family's colour, its marker): points =
    {method: (n_runs, 2) deltas on the results.AXES keys x and y} (`explorer.trade_off_points`). Up and right is
    better; the pretrained model sits at (0, 0)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.2))
    _pretrained(ax)
    for m, p in points.items():
        st = style(m)
        ax.scatter(100 * p[:, 0], 100 * p[:, 1], s=14, alpha=0.45, color=st["color"], marker=st["marker"])
        ax.scatter(100 * p[:, 0].mean(), 100 * p[:, 1].mean(), s=80, color=st["color"], marker=st["marker"],
                   edgecolor="black", label=f"{m.removeprefix('toy-')} ({len(p)})")
    _better(ax)
    ax.set_xlabel(f"change in {AXES[x][2]} (points)")
    ax.set_ylabel(f"change in {AXES[y][2]} (points)")
    legend_outside(ax, fontsize=7, ncol=2 if len(points) > 12 else 1)
    return ax.figure


def curves(history: list[dict], label: str = "", axes=None, method: str | None = None):
    """Validation fine-grained and generic mAP@20 against target steps, in the colour and marker of `method` (by
    default the method `label` names: "naive", "l2sp", "combination"), so a method keeps its colour from figure
    to figure; call it once per method on the same `axes` to compare."""
    rows = [h for h in history if f"val/{FINE}" in h]
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    st = style(method or label)
    steps = [h["target_step"] for h in rows]
    for ax, key, title in zip(axes, (f"val/{FINE}", f"val/{GENERIC}"),
                              ("fine-grained validation mAP@20", "generic validation mAP@20")):
        ax.plot(steps, [h[key] for h in rows], marker=st["marker"], color=st["color"], label=label or None)
        ax.set_xlabel("target steps")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.set_xlim(left=0)
    if label:
        legend_outside(axes[-1])
    return axes[0].figure


def drift(drifts: dict[str, dict], axes=None):
    """Where forgetting happens: per part of the tower, the relative weight distance from the pretrained weights
    (left, from 0) and the linear CKA of each block's output with the pretrained one (right; solid: generic images,
    dashed: fine-grained). One colour and marker per method; one legend right of the panels. drifts: {method:
    drift.layer_drift(...)}."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    styles = ("-", "--", ":")
    handles = []
    for method, d in drifts.items():
        st = style(method)
        parts = d["groups"]
        axes[0].plot(range(len(parts)), [d["weight"][g] for g in parts], marker=st["marker"], color=st["color"],
                     label=method.removeprefix("toy-"))
        for (domain, cka), ls in zip(d["cka"].items(), styles):
            names = list(cka)
            axes[1].plot([parts.index(n) for n in names], list(cka.values()), marker=st["marker"], ls=ls,
                         color=st["color"], label=f"{method.removeprefix('toy-')} ({domain})")
        handles.append(Line2D([], [], color=st["color"], marker=st["marker"], label=method.removeprefix("toy-")))
    first = next(iter(drifts.values()))
    parts = first["groups"]
    handles += [Line2D([], [], color="black", ls=ls, label=f"CKA on {domain} images")
                for domain, ls in zip(first["cka"], styles)]
    for ax in axes:
        ax.set_xticks(range(len(parts)), parts, rotation=30, fontsize=8)
    axes[0].set_ylabel("||theta - theta0|| / ||theta0||")
    axes[0].set_title("weight distance from the pretrained tower", fontsize=10)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylabel("linear CKA vs pretrained")
    axes[1].set_title("features of each block vs the pretrained ones", fontsize=10)
    axes[1].set_ylim(0, 1.02)
    legend_outside(axes[-1], handles=handles)
    return axes[0].figure


def agreement(histories: dict[str, list[dict]], ax=None):
    """Teacher agreement over training: mean cosine between each generic validation image's embedding and the
    pretrained model's (`val/generic_agreement` in a run's history), against target steps. The y axis starts at 0
    unless the curves all sit near 1; then it is marked as cut."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.4))
    for method, history in histories.items():
        rows = [h for h in history if "val/generic_agreement" in h]
        if not rows:
            raise ValueError(f"the history of {method} logs no val/generic_agreement (a run from before the kit "
                             "logged it): delete its folder to train it again")
        st = style(method)
        ax.plot([h["target_step"] for h in rows], [h["val/generic_agreement"] for h in rows], marker=st["marker"],
                color=st["color"], label=method.removeprefix("toy-"))
    ax.set_xlabel("target steps")
    ax.set_ylabel("mean cos(student, teacher)")
    ax.set_title("agreement with the pretrained model on generic images", fontsize=10)
    _from_zero(ax)
    legend_outside(ax)
    return ax.figure


def scored(ax, x, y, values, label: str, cmap: str = "viridis", **kw):
    """A scatter coloured by `values` (e.g. search trials by their validation score) with a colour bar labelled
    `label`: a colour scale never goes unexplained. Returns the scatter."""
    sc = ax.scatter(x, y, c=values, cmap=cmap, **{"s": 50, "edgecolor": "k", **kw})
    ax.figure.colorbar(sc, ax=ax, label=label)
    return sc


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
    palette = GROUPS
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
    legend_outside(ax, markerscale=3, fontsize=7)
    return ax.figure
