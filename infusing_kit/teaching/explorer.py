"""The ablation explorer: every run of a results registry and every trial of its searches, with widgets.

  AblationExplorer(rows, trials=None, galleries=None).widget       # in a notebook (chapter 11)
  make explorer [COMPARISON=DIR]                                    # the same page served by Voila

What a user can do:
- choose methods, seeds and the two axes of the trade-off plot (each run a small point, each method's mean a
  large one);
- pick a run: its metric table (before / after / change) and, where its model is available (a run made here, with
  its model.pt) or a committed gallery exists, a retrieval gallery: a fine-grained test query, its top-5 before
  and after fine-tuning, correct neighbours framed green;
- pick a method with a search and slide over its searched strength: the sweep of validation scores with the
  trial at the slider highlighted and the chosen value marked;
- the paper's Figure-1 bars for the selected methods.

The data functions (`trade_off_points`, `run_table`, `search_sweep`, `gallery_of`) take rows and a selection and
return data; `AblationExplorer` wires them to widgets and to `figures`. Every callback is a small method that returns
what it drew (tests call them directly, and a browser test drives the page). Nothing here trains; test metrics come from the registry, validation scores from the trials.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np

from . import figures
from ..metrics import FINE, GENERIC, MEAN
from ..protocol.results import AXES, deltas, summarise

K_GALLERY = 5


# Output widgets get their content by setting `outputs` directly, never through the capture context (`with out:`):
# a headless client (papermill's nbclient, Voila's executor) could wait forever on a cell that captured into a
# widget no page shows (seen in chapter 11's checks, kernel idle, client waiting).
def _show_figure(out: widgets.Output, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    out.outputs = ({"output_type": "display_data", "metadata": {},
                    "data": {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": "<figure>"}},)


def _show_html(out: widgets.Output, text: str) -> None:
    out.outputs = ({"output_type": "display_data", "metadata": {}, "data": {"text/html": text, "text/plain": text}},)


def _show_text(out: widgets.Output, text: str) -> None:
    out.outputs = ({"output_type": "stream", "name": "stdout", "text": text + "\n"},)


class AblationExplorer:
    def __init__(self, rows: list[dict], trials: list[dict] | None = None, galleries: dict | None = None):
        self.rows = [r for r in rows if r.get("finetuned")]
        if not self.rows:
            raise ValueError("the explorer needs finished runs with test metrics (a results registry)")
        self.trials = [t for t in (trials or []) if t.get("state", "complete") == "complete"]
        self.galleries = galleries or {}
        self._worlds: dict = {}
        methods = sorted({r["method"] for r in self.rows}, key=lambda m: (m != "toy-naive", m != "toy-paper", m))
        seeds = sorted({r["seed"] for r in self.rows})
        axis = [(f"change: {AXES[a][2]}", a) for a in AXES]
        self.methods = widgets.SelectMultiple(options=methods, value=tuple(methods), description="methods",
                                              rows=min(10, len(methods)))
        self.seeds = widgets.SelectMultiple(options=seeds, value=tuple(seeds), description="seeds", rows=min(5, len(seeds)))
        self.x = widgets.Dropdown(options=axis, value="i2t", description="x")
        self.y = widgets.Dropdown(options=axis, value="fine", description="y")
        self.run = widgets.Dropdown(options=self._run_options(), description="run")
        self.query = widgets.IntSlider(value=0, min=0, max=5, description="query")
        searched = sorted({t["method"] for t in self.trials if t["params"]})
        self.sweep_method = widgets.Dropdown(options=searched or ["(no trials)"], description="search")
        self.strength = widgets.SelectionSlider(options=[0.0], description="strength", continuous_update=False)
        self.plot_out, self.run_out, self.gallery_out = widgets.Output(), widgets.Output(), widgets.Output()
        self.sweep_out, self.fig1_out = widgets.Output(), widgets.Output()
        for w in (self.methods, self.seeds, self.x, self.y):
            w.observe(lambda _: self._refresh_runs(), names="value")
        self.run.observe(lambda _: self.show_run(), names="value")
        self.query.observe(lambda _: self.show_gallery(), names="value")
        self.sweep_method.observe(lambda _: self._reset_strength(), names="value")
        self.strength.observe(lambda _: self.draw_sweep(), names="value")
        title = lambda t: widgets.HTML(f"<h3 style='margin:6px 0'>{t}</h3>")
        self.widget = widgets.VBox([
            title("Trade-off: every run"),
            widgets.HBox([self.methods, widgets.VBox([self.seeds, self.x, self.y])]), self.plot_out,
            title("One run: metrics and retrieval gallery"), widgets.HBox([self.run, self.query]),
            widgets.HBox([self.run_out, self.gallery_out]),
            title("A search: validation scores against the searched strength"),
            widgets.HBox([self.sweep_method, self.strength]), self.sweep_out,
            title("Figure 1: change vs the pretrained model"), self.fig1_out])
        self._reset_strength()
        self.draw()
        self.show_run()
        self.draw_figure1()

    # ------------------------------------------------------------------------ the trade-off plot
    def selected_rows(self) -> list[dict]:
        return select_rows(self.rows, self.methods.value, self.seeds.value)

    def points(self) -> dict[str, np.ndarray]:
        return trade_off_points(self.rows, self.methods.value, self.seeds.value, self.x.value, self.y.value)

    def draw(self) -> dict[str, np.ndarray]:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        pts = self.scatter(ax)
        _show_figure(self.plot_out, fig)
        return pts

    def scatter(self, ax) -> dict[str, np.ndarray]:
        """The trade-off scatter of the selection on `ax` (one dot per run, a large dot per method's mean)."""
        pts = self.points()
        figures.run_points(pts, self.x.value, self.y.value, ax)
        return pts

    def _refresh_runs(self) -> None:
        self.draw()
        current = self.run.value
        self.run.options = self._run_options()
        if current in dict(self.run.options).values():
            self.run.value = current
        self.draw_figure1()

    # ------------------------------------------------------------------------ one run
    def _run_options(self) -> list[tuple[str, int]]:
        rows = self.selected_rows() if hasattr(self, "methods") else self.rows
        return [(f"{r['method']} · seed {r['seed']}", self.rows.index(r)) for r in rows] or [("(no run)", -1)]

    def run_table(self, i: int) -> str:
        return run_table(self.rows[i])

    def show_run(self) -> str:
        i = self.run.value
        text = self.run_table(i) if i is not None and i >= 0 else "<p>no run selected</p>"
        _show_html(self.run_out, text)
        self.show_gallery()
        return text

    def gallery_data(self, i: int, n_queries: int = 6) -> dict | None:
        return gallery_of(self.rows[i], self.galleries, n_queries)

    def show_gallery(self) -> dict | None:
        i = self.run.value
        g = self.gallery_data(i) if i is not None and i >= 0 else None
        if g is None:
            _show_text(self.gallery_out, "No model for this run here (run it with --out here, or use the committed "
                                         "galleries).")
        else:
            self.query.max = len(g["queries"]) - 1
            q = min(self.query.value, self.query.max)
            _show_figure(self.gallery_out, gallery_figure(self._test_images(g), g, q))
        return g

    def _test_images(self, g: dict):
        key = json.dumps(g.get("world") or g["config"], sort_keys=True)
        if key not in self._worlds:
            self._worlds[key] = gallery_images(g)
        return self._worlds[key]

    # ------------------------------------------------------------------------ a search
    def _reset_strength(self) -> None:
        trials = trials_of(self.trials, self.sweep_method.value)
        if not trials:
            self.strength.options = [0.0]
            return
        field = searched_field(trials)
        values = sorted({t["params"][field] for t in trials})
        self.strength.options = [(f"{v:.3g}", v) for v in values]
        self.strength.value = values[len(values) // 2]
        self.draw_sweep()

    def sweep(self, method: str, value: float | None = None) -> dict:
        return search_sweep(self.trials, method, value)

    def draw_sweep(self) -> dict:
        s = self.sweep(self.sweep_method.value, self.strength.value)
        if not s:
            _show_text(self.sweep_out, "no search trials loaded")
            return s
        fig, ax = plt.subplots(figsize=(6.4, 3.4))
        figures.sweep(s["trials"], s["field"], ax=ax, highlight=s["highlight"],
                      chosen=s["chosen"])
        _show_figure(self.sweep_out, fig)
        return s

    # ------------------------------------------------------------------------ Figure 1
    def draw_figure1(self) -> list[dict]:
        summary = summarise(self.selected_rows())
        if summary:
            fig = figures.figure1(summary, methods=tuple(s["method"] for s in summary))
            _show_figure(self.fig1_out, fig)
        else:
            _show_text(self.fig1_out, "no run selected")
        return summary


# ---------------------------------------------------------------------------- data functions (no widgets)
def select_rows(rows: list[dict], methods, seeds) -> list[dict]:
    return [r for r in rows if r["method"] in methods and r["seed"] in seeds]


def trade_off_points(rows: list[dict], methods, seeds, x: str, y: str) -> dict[str, np.ndarray]:
    """method -> (n_runs, 2) array of (x, y) deltas (results.AXES keys) for the selected methods and seeds."""
    pts = {}
    for m in methods:
        d = [deltas(r) for r in select_rows(rows, methods, seeds) if r["method"] == m]
        if d:
            pts[m] = np.array([[v[x], v[y]] for v in d])
    return pts


def run_table(r: dict) -> str:
    """HTML table of one run's test metrics: pretrained, fine-tuned, change."""
    lines = ["<table style='border-collapse:collapse;font-size:12px'><tr><th align=left>metric</th>"
             "<th>pretrained</th><th>fine-tuned</th><th>change</th></tr>"]
    for group in ("in_domain", "generic_image", "image_text"):
        for k, after in r["finetuned"][group].items():
            if k == "skipped":
                continue
            before = r["pretrained"][group][k]
            lines.append(f"<tr><td>{group}/{html.escape(k)}</td><td align=right>{before:.3f}</td>"
                         f"<td align=right>{after:.3f}</td><td align=right>{after - before:+.3f}</td></tr>")
    upd = r.get("updates") or {}
    lines.append("</table><p style='font-size:12px'>" + html.escape(
        f"{r['method']}, seed {r['seed']}; kept step {r.get('best_step')}; batches target/generic "
        f"{upd.get('target', '?')}/{upd.get('generic', '?')}") + "</p>")
    return "".join(lines)


def trials_of(trials: list[dict], method: str) -> list[dict]:
    return [t for t in trials if t["method"] == method and t["params"]]


def searched_field(trials: list[dict]) -> str:
    """The strength a search explored (its first field other than the backbone learning rate)."""
    names = list(trials[0]["params"])
    return next((f for f in names if f != "lr_backbone"), names[0])


def search_sweep(trials: list[dict], method: str, value: float | None = None) -> dict:
    """The trials of `method`'s search sorted by its searched strength: x, validation scores, the trial nearest to
    `value` (highlighted) and the chosen (best on the selection key) trial; {} without trials."""
    trials = trials_of(trials, method)
    if not trials:
        return {}
    field = searched_field(trials)
    trials = sorted(trials, key=lambda t: t["params"][field])
    select = (trials[0].get("train") or {}).get("select") or (FINE if method.startswith("toy-naive") else MEAN)
    chosen = max(trials, key=lambda t: t["val"].get(select, -1))  # on the key the trials selected on (their config)
    value = chosen["params"][field] if value is None else value
    near = min(trials, key=lambda t: abs(np.log(t["params"][field] + 1e-12) - np.log(value + 1e-12)))
    return {"field": field, "trials": trials, "x": [t["params"][field] for t in trials],
            "fine": [t["val"].get(FINE) for t in trials], "generic": [t["val"].get(GENERIC) for t in trials],
            "highlight": near, "chosen": chosen}


def _gallery_key(row: dict) -> str:
    """A run's key in a galleries file: its label (a rule's or search seed's variant apart) and seed."""
    from ..protocol.results import label
    return f"{label(row)}|{row['seed']}"


def gallery_of(row: dict, galleries: dict, n_queries: int = 6) -> dict | None:
    """Neighbours of a few fine-grained test queries before and after fine-tuning for a run: from a committed
    gallery, or computed from the run's model.pt (runs made here). None when neither exists."""
    key = _gallery_key(row)
    if key in galleries:
        return galleries[key]
    run_dir = Path(row.get("run_dir") or "")
    if row.get("run_dir") and (run_dir / "model.pt").exists() and (run_dir / "metrics.json").exists():
        return gallery_from_run(run_dir, n_queries)
    return None


def page_data(comparison: str | Path, trials: str | Path | None = None, galleries: str | Path | None = None):
    """(rows, trials, galleries) for the explorer. comparison: a results registry (its non-smoke rows, with the
    `trials` and `galleries` files), or a `compare --out` folder: every row of its results.jsonl, its trials.jsonl
    and its galleries.json where they exist."""
    from ..protocol.results import load_results, load_trials
    comparison = Path(comparison)
    if comparison.is_dir():
        if not (comparison / "results.jsonl").exists():
            raise FileNotFoundError(f"{comparison} holds no results.jsonl: give a `compare --out` folder or a registry")
        rows = load_results(comparison / "results.jsonl")
        trials, galleries = comparison / "trials.jsonl", comparison / "galleries.json"
    else:
        rows = load_results(comparison, smoke=False)
    t = load_trials(trials) if trials is not None and Path(trials).exists() else []
    g = json.loads(Path(galleries).read_text()) if galleries is not None and Path(galleries).exists() else {}
    return rows, t, g


def gallery_from_run(run_dir: str | Path, n_queries: int = 6) -> dict:
    """Top-k fine-grained test neighbours of evenly spaced queries, before (pretrained) and after (model.pt)."""
    from .chapters import load_run
    from ..metrics import knn_search
    from ..models import embed_images
    m, after, before, data = load_run(run_dir)
    test = data.target_test
    queries = np.linspace(0, len(test) - 1, n_queries).astype(int)
    out = {("world" if "world" in m else "config"): m.get("world") or m["config"], "queries": queries.tolist(),
           "method": m["preset"], "seed": m["seed"]}
    for when, vlm in (("before", before), ("after", after)):
        emb = embed_images(vlm, test, progress=False)
        _, nn = knn_search(emb[queries], emb, k=K_GALLERY + 1)
        nn = np.array([[j for j in row if j != q][:K_GALLERY] for row, q in zip(nn, queries)])  # self by identity
        out[when] = nn.tolist()
        out[f"{when}_relevant"] = (test.labels[nn] == test.labels[queries][:, None]).tolist()
    return out


def gallery_images(g: dict):
    """The fine-grained test split a gallery indexes: the built-in world's (its "world") or a config's files."""
    if g.get("world"):
        from .. import world as W
        return W.make_world(W.config_from_dict(g["world"])).fine_test
    from ..protocol.formats import read_split
    return read_split(g["config"], "target", "test")


def make_galleries(rows: list[dict], out: str | Path, seeds=(0,), n_queries: int = 6) -> dict:
    """Galleries for the registry's runs of `seeds` whose model is here, written to `out` (JSON) to commit."""
    g = {}
    for r in rows:
        if r["seed"] in seeds and r.get("run_dir") and (Path(r["run_dir"]) / "model.pt").exists():
            g[_gallery_key(r)] = gallery_from_run(r["run_dir"], n_queries)
    Path(out).write_text(json.dumps(g))
    return g


def gallery_figure(images, g: dict, q: int):
    """Query q of a gallery (`gallery_of`): its top-k before and after fine-tuning (`figures.gallery`)."""
    query, nn = g["queries"][q], np.array([g["before"][q], g["after"][q]])
    take = images.take if hasattr(images, "take") else (lambda idx: images[np.asarray(idx)])  # a split or its images
    fig = figures.gallery(take([query, query]), take(nn.reshape(-1)), np.arange(nn.size).reshape(nn.shape),
                          np.array([g["before_relevant"][q], g["after_relevant"][q]]), row_labels=["before", "after"])
    fig.suptitle(f"{g['method']} seed {g['seed']}: top-{len(g['before'][q])} (green: same class)", fontsize=9)
    return fig
