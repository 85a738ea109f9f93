"""The results registry and the comparison it feeds (table, trade-off figure, Figure-1 style deltas).

A registry is a JSON-lines file, one row per finished run (append-only: rows are never rewritten; a new
comparison writes a new file):
  {"method", "seed", "smoke", "overrides", "train": TrainConfig, "val": {...}, "best_step", "updates":
   {"target", "generic", "backbone"}, "pretrained": {...}, "finetuned": {...}, "warnings", "seconds", "device",
   "code", "run_dir", "finished"}
`summarise(rows)` turns rows into one line per method: mean and standard deviation over seeds of the
three deltas vs the pretrained model (fine-grained mAP@20 gain, generic mAP@20 change, i2t R@1 change),
plus the share of the naive gain kept and of the naive forgetting left.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

AXES = {  # name: (group in metrics.json, key, label)
    "fine": ("in_domain", "map@20", "fine-grained mAP@20"),
    "generic": ("generic_image", "map@20", "generic image mAP@20"),
    "i2t": ("image_text", "i2t_r@1", "image->text R@1"),
}
# one colour per method, everywhere (Okabe-Ito and Tol's colour-blind-safe palettes)
COLOURS = {
    "toy-naive": "#D55E00", "toy-paper": "#0072B2", "toy-l2sp": "#56B4E9", "toy-l2sp-sum": "#88CCEE",
    "toy-ewc": "#009E73", "toy-l2-zero": "#999999", "toy-distill": "#CC79A7", "toy-distill-cos": "#AA4499",
    "toy-relational": "#882255", "toy-lwf": "#E69F00", "toy-mix-balanced": "#DDCC77",
    "toy-mix-proportional": "#999933", "toy-low-lr": "#332288", "toy-lp-ft": "#44AA99", "toy-freeze": "#117733",
    "toy-wise-ft": "#F0E442", "toy-lora": "#661100", "toy-lines": "#B8860B", "toy-two-seed-merge": "#6A5ACD",
}


def append_result(path: str | Path, metrics: dict, run_dir: str | Path | None = None) -> dict:
    """Append one finished run to the registry (creating it). Returns the row."""
    row = {"method": metrics["preset"], "seed": metrics["seed"], "smoke": metrics["smoke"],
           "overrides": metrics.get("overrides", {}), "train": metrics["train"], "val": metrics.get("val", {}),
           "best_step": metrics.get("best_step"), "updates": metrics.get("updates"),
           "pretrained": metrics["pretrained"], "finetuned": metrics["finetuned"], "warnings": metrics.get("warnings", []),
           "seconds": metrics["seconds"], "device": metrics.get("device"), "code": metrics.get("code"),
           "world": (metrics.get("world") or {}).get("kind", "far" if metrics.get("world") else None),
           "weights": metrics.get("weights"), "threads": metrics.get("threads"), "torch": metrics.get("torch"),
           "run_dir": str(run_dir) if run_dir else None, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def load_results(path: str | Path, smoke: bool | None = None) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results registry at {path}; run experiments with --registry {path} first")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i} is not valid JSON ({e}); fix or remove that line") from e
    return [r for r in rows if smoke is None or r["smoke"] == smoke]


def load_trials(path: str | Path, method: str | None = None) -> list[dict]:
    """Search trials exported by `python -m infusing_kit trials` (validation scores only), optionally one method's."""
    rows = load_results(path)
    if rows and "params" not in rows[0]:
        raise ValueError(f"{path} is not a trials file (rows have no 'params'); write one with "
                         "`python -m infusing_kit trials --storage DB --out FILE`")
    return [r for r in rows if method is None or r["method"] == method]


def deltas(row: dict) -> dict[str, float]:
    """Fine-tuned minus pretrained, on the three axes (test metrics)."""
    return {a: row["finetuned"][g][k] - row["pretrained"][g][k] for a, (g, k, _) in AXES.items()}


def summarise(rows: list[dict], baseline: str = "toy-naive") -> list[dict]:
    """One dict per method: n seeds, mean/std of each delta, and kept-gain / left-forgetting vs the baseline."""
    rows = [r for r in rows if r.get("finetuned")]
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != baseline, m != "toy-paper", m))
    out = []
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        d = [deltas(r) for r in mine]
        s = {"method": m, "seeds": len(d)}
        for kind in ("target", "generic", "backbone"):  # optimiser steps of each kind (mean over seeds)
            counts = [r["updates"][kind] for r in mine if kind in (r.get("updates") or {})]
            s[f"{kind}_updates"] = float(np.mean(counts)) if counts else float("nan")
        for a in AXES:
            v = np.array([x[a] for x in d])
            s[f"{a}_mean"], s[f"{a}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append(s)
    base = next((s for s in out if s["method"] == baseline), None)
    for s in out:
        if base is not None:
            s["gain_kept"] = s["fine_mean"] / base["fine_mean"] if base["fine_mean"] else float("nan")
            for a in ("generic", "i2t"):
                s[f"{a}_drop_left"] = s[f"{a}_mean"] / base[f"{a}_mean"] if base[f"{a}_mean"] < 0 else float("nan")
    return out


def dominating(summary: list[dict], method: str) -> list[str]:
    """Methods whose mean is better than `method`'s on all three axes (more gain, less forgetting on both)."""
    ref = next((s for s in summary if s["method"] == method), None)
    if ref is None:
        raise KeyError(f"{method!r} is not in the summary ({[s['method'] for s in summary]})")
    return [s["method"] for s in summary if s["method"] != method and all(s[f"{a}_mean"] > ref[f"{a}_mean"] for a in AXES)]


def markdown_table(summary: list[dict]) -> str:
    head = ("| method | seeds | target / generic batches | fine mAP@20 gain | generic mAP@20 change | i2t R@1 change | "
            "gain kept | generic drop left | i2t drop left |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for s in summary:
        batches = (f"{s['target_updates']:.0f} / {s['generic_updates']:.0f}"
                   if np.isfinite(s.get("target_updates", float("nan"))) else "n/a")
        cells = [s["method"], str(s["seeds"]), batches]
        cells += [f"{s[f'{a}_mean']:+.3f} ± {s[f'{a}_std']:.3f}" for a in AXES]
        cells += [f"{s[k]:.0%}" if k in s and np.isfinite(s[k]) else "n/a"
                  for k in ("gain_kept", "generic_drop_left", "i2t_drop_left")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ACCEPTANCE = {"gain_kept": 0.85, "generic_drop_left": 0.25, "i2t_drop_left": 0.25}


def acceptance(rows: list[dict], method: str = "toy-paper", baseline: str = "toy-naive",
               seeds: list[int] | None = None) -> dict:
    """The paper's claim on the kit's world, checked on the seeds both methods ran (test sets): `method` keeps
    >= 85% of `baseline`'s fine-grained mAP@20 gain, with <= 25% of its generic mAP@20 drop and of its image->text
    R@1 drop (means over seeds). Returns the ratios, the same ratios per seed, and "passed"."""
    by = {(r["method"], r["seed"]): r for r in rows if r.get("finetuned") and r["method"] in (method, baseline)}
    common = sorted({s for m, s in by if m == method} & {s for m, s in by if m == baseline})
    if seeds is not None:
        common = [s for s in common if s in seeds]
    if not common:
        raise ValueError(f"no seed has finished runs of both {method} and {baseline}")
    summ = {s["method"]: s for s in summarise([by[(m, s)] for m in (baseline, method) for s in common], baseline)}
    out = {"seeds": common, **{k: summ[method][k] for k in ACCEPTANCE}}
    out["per_seed"] = {}
    for s in common:
        one = {x["method"]: x for x in summarise([by[(baseline, s)], by[(method, s)]], baseline)}[method]
        out["per_seed"][s] = {k: one[k] for k in ACCEPTANCE}
    out["passed"] = bool(out["gain_kept"] >= ACCEPTANCE["gain_kept"] and
                         out["generic_drop_left"] <= ACCEPTANCE["generic_drop_left"] and
                         out["i2t_drop_left"] <= ACCEPTANCE["i2t_drop_left"])
    return out
