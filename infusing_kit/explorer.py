"""Ablation explorer: pick methods and two axes, see every run and the per-method means (ipywidgets).

`AblationExplorer(rows)` builds the widgets; `.widget` is what a notebook displays. `.draw()` redraws and
returns the points it plotted, so tests (and CI, headless) can drive the controls by setting `.value`
and check what changed without a browser.
"""
from __future__ import annotations

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np

from .results import AXES, COLOURS, deltas


class AblationExplorer:
    def __init__(self, rows: list[dict]):
        self.rows = [r for r in rows if r.get("finetuned")]
        if not self.rows:
            raise ValueError("the explorer needs finished runs with test metrics (a results registry)")
        methods = sorted({r["method"] for r in self.rows})
        labels = {a: AXES[a][2] for a in AXES}
        self.methods = widgets.SelectMultiple(options=methods, value=tuple(methods), description="methods",
                                              rows=min(10, len(methods)))
        self.x = widgets.Dropdown(options=[(f"change: {labels[a]}", a) for a in AXES], value="i2t", description="x")
        self.y = widgets.Dropdown(options=[(f"change: {labels[a]}", a) for a in AXES], value="fine", description="y")
        self.out = widgets.Output()
        for w in (self.methods, self.x, self.y):
            w.observe(lambda _: self.draw(), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.methods, widgets.VBox([self.x, self.y])]), self.out])
        self.draw()

    def points(self) -> dict[str, np.ndarray]:
        """method -> (n_runs, 2) array of (x, y) deltas for the selected methods and axes."""
        pts = {}
        for m in self.methods.value:
            d = [deltas(r) for r in self.rows if r["method"] == m]
            pts[m] = np.array([[x[self.x.value], x[self.y.value]] for x in d])
        return pts

    def draw(self) -> dict[str, np.ndarray]:
        pts = self.points()
        with self.out:
            self.out.clear_output(wait=True)
            fig, ax = plt.subplots(figsize=(6, 4.2))
            for m, p in pts.items():
                c = COLOURS.get(m, "#444444")
                ax.scatter(100 * p[:, 0], 100 * p[:, 1], s=14, alpha=0.45, color=c)
                ax.scatter(100 * p[:, 0].mean(), 100 * p[:, 1].mean(), s=80, color=c, edgecolor="black",
                           label=f"{m.removeprefix('toy-')} ({len(p)})")
            ax.set_xlabel(f"change in {AXES[self.x.value][2]} (points)")
            ax.set_ylabel(f"change in {AXES[self.y.value][2]} (points)")
            ax.axhline(0, color="black", lw=0.5, ls=":"), ax.axvline(0, color="black", lw=0.5, ls=":")
            ax.legend(fontsize=7, frameon=False)
            plt.show()
        plt.close("all")
        return pts
