"""The comparison a registry feeds (table, trade-off figure, Figure-1 style deltas, paired intervals); the
registry itself (its rows, written and read) is registry.py, re-exported here.

`summarise(rows)` turns rows into one line per method: mean and standard deviation over seeds of the
three deltas vs the pretrained model (fine-grained mAP@20 gain, generic mAP@20 change, i2t R@1 change),
plus the share of the naive gain kept and of the naive forgetting left.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..metrics import K
from .registry import append_result, label, load_results, load_trials, main_choices, row_of  # noqa: F401

AXES = {  # name: (group in metrics.json, key, label)
    "fine": ("in_domain", f"map@{K}", "fine-grained mAP@20"),
    "generic": ("generic_image", f"map@{K}", "generic image mAP@20"),
    "i2t": ("image_text", "i2t_r@1", "image->text R@1"),
}


def deltas(row: dict) -> dict[str, float]:
    """Fine-tuned minus pretrained, on the three axes (test metrics)."""
    return {a: row["finetuned"][g][k] - row["pretrained"][g][k] for a, (g, k, _) in AXES.items()}


def world_summary(path: str | Path) -> dict[str, dict]:
    """A registry's `summarise` by method (main choices, every seed each ran, against the registry's baseline)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such registry (a results .jsonl file written by `compare`)")
    rows = load_results(path, smoke=False)
    return {s["method"]: s for s in summarise(main_choices(rows), baseline=baseline_of(rows))}


def worlds_table(worlds: dict[str, dict[str, dict]]) -> str:
    """Markdown: each method of every world (`world_summary`) in points against its own world's baseline, with the
    share of the baseline's gain kept and of its drops left in brackets."""
    pct = lambda x: "" if x != x else f" ({x:.0%})"
    cells = lambda s: [""] * 3 if s is None else [
        f"{100 * s['fine_mean']:+.1f}{pct(s.get('gain_kept', float('nan')))}",
        f"{100 * s['generic_mean']:+.1f}{pct(s.get('generic_drop_left', float('nan')))}",
        f"{100 * s['i2t_mean']:+.1f}{pct(s.get('i2t_drop_left', float('nan')))}"]
    head = [f"{w}: {a}" for w in worlds for a in ("gain (kept)", "generic (left)", "image-text R@1 (left)")]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for m in dict.fromkeys(m for w in worlds.values() for m in w):
        lines.append(f"| {m} | " + " | ".join(c for w in worlds.values() for c in cells(w.get(m))) + " |")
    return "\n".join(lines)


def baseline_of(rows: list[dict]) -> str:
    """The baseline of a registry, by its role: rows a comparison tagged {"role": "baseline"}, else toy-naive."""
    tagged = {r["method"] for r in rows if (r.get("tags") or {}).get("role") == "baseline"}
    if len(tagged) == 1:
        return tagged.pop()
    if any(r["method"] == "toy-naive" for r in rows):
        return "toy-naive"
    raise ValueError("the registry names no baseline (no row tagged role=baseline, no toy-naive): pass --baseline")


def summarise(rows: list[dict], baseline: str = "toy-naive") -> list[dict]:
    """One dict per method (`label`): n seeds, mean/std of each delta, and kept-gain / left-forgetting vs the
    baseline."""
    rows = [r for r in rows if r.get("finetuned")]
    methods = sorted({label(r) for r in rows}, key=lambda m: (m != baseline, m != "toy-paper", m))
    out = []
    for m in methods:
        mine = [r for r in rows if label(r) == m]
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
    by = {(label(r), r["seed"]): r for r in rows if r.get("finetuned") and label(r) in (method, baseline)}
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


PAPER = {"naive": {"fine": 31.0, "generic": -6.0, "i2t": -12.7},          # Figure 1, points (docs/method.md)
         "the paper's method": {"fine": 29.9, "generic": -0.1, "i2t": -0.9}}


def paired(rows: list[dict], method: str, against: str, confidence: float = 0.95) -> dict:
    """Per-seed paired differences `method` minus `against` of each delta (test sets, the seeds both ran), with
    their mean, standard deviation and a t-interval: mean +- t_{(1+c)/2, n-1} sd / sqrt(n). Returns
    {"seeds", axis: {"mean", "sd", "low", "high", "per_seed"}}; an interval that excludes 0 is a difference the
    seeds support."""
    from scipy import stats
    by = {}
    for r in rows:
        if r.get("finetuned") and label(r) in (method, against):
            by[(label(r), r["seed"])] = deltas(r)
    seeds = sorted({s for m, s in by if m == method} & {s for m, s in by if m == against})
    out = {"method": method, "against": against, "seeds": seeds}
    for a in AXES:
        d = np.array([by[(method, s)][a] - by[(against, s)][a] for s in seeds])
        n = len(d)
        mean = float(d.mean()) if n else float("nan")
        sd = float(d.std(ddof=1)) if n > 1 else float("nan")
        half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
        out[a] = {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "per_seed": d.tolist()}
    return out


def verdict(interval: dict, better: str = "higher") -> str:
    """In words what a paired interval supports: 'better', 'worse' or 'no difference shown' (it contains 0)."""
    if not np.isfinite(interval["low"]):
        return "too few seeds"
    if interval["low"] > 0:
        return "better" if better == "higher" else "worse"
    if interval["high"] < 0:
        return "worse" if better == "higher" else "better"
    return "no difference shown"


def paired_table(rows: list[dict], methods: list[str], against: str) -> str:
    """Markdown: for each method, the paired difference against `against` on each axis, in points (x 100), as
    mean [95% interval], and n seeds."""
    head = (f"| method - {against} | seeds | fine mAP@20 gain | generic mAP@20 change | i2t R@1 change |\n"
            "|---|---|---|---|---|")
    lines = [head]
    for m in methods:
        if m == against:
            continue
        p = paired(rows, m, against)
        if not p["seeds"]:
            continue
        cells = [f"{100 * p[a]['mean']:+.1f} [{100 * p[a]['low']:+.1f}, {100 * p[a]['high']:+.1f}]" for a in AXES]
        lines.append(f"| {m} | {len(p['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def points_table(summary: list[dict], paper: bool = True) -> str:
    """Markdown: each method's mean changes in points (x 100) on the three axes, beside the paper's Figure 1."""
    lines = ["| method | seeds | fine-grained gain | generic change | image-text change |", "|---|---|---|---|---|"]
    if paper:
        for name, v in PAPER.items():
            lines.append(f"| paper: {name} (SigLIP, SOP etc.) | | {v['fine']:+.1f} | {v['generic']:+.1f} | "
                         f"{v['i2t']:+.1f} |")
    for s in summary:
        lines.append(f"| {s['method']} | {s['seeds']} | " + " | ".join(f"{100 * s[f'{a}_mean']:+.1f}" for a in AXES)
                     + " |")
    return "\n".join(lines)


# results/current.json names the kit's current committed results, per world and kind: the one place that says
# which file a chapter, README or script reads. A new comparison writes new files and repoints the manifest; the
# files it replaces move to results/superseded/ (nothing is rewritten).
RESULTS = Path(__file__).resolve().parents[2] / "results"


def current(world: str = "near", kind: str = "comparison", manifest: str | Path | None = None) -> Path | None:
    """The current results file of `kind` ("comparison", "trials", "chosen", ...) for `world` ("near" or "far"),
    from the manifest (default results/current.json), or None when that world has no current result of that kind
    (a chapter then shows no table rather than another world's)."""
    manifest = Path(manifest) if manifest is not None else RESULTS / "current.json"
    if not manifest.exists():
        raise FileNotFoundError(f"no results manifest at {manifest}; it names the current registry of each world "
                                "(see results/README.md)")
    worlds = json.loads(manifest.read_text())["worlds"]
    if world not in worlds:
        raise ValueError(f"{manifest} has no world {world!r}; it has {sorted(worlds)}")
    name = worlds[world].get(kind)
    if name is None:
        return None
    path = manifest.parent / name
    if not path.exists():
        raise FileNotFoundError(f"{manifest} names {name} as the {world} world's current {kind}, but {path} does not "
                                "exist: restore it, or point the manifest at the file that replaced it")
    return path


def _t_interval(values: list[float], confidence: float = 0.95) -> dict:
    from scipy import stats
    v = np.asarray(values, dtype=float)
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "low": mean - half, "high": mean + half, "per_seed": v.tolist()}


def claim(rows: list[dict], method: str = "toy-paper", baseline: str = "toy-naive", seeds: list[int] | None = None,
          confidence: float = 0.95) -> dict:
    """The paper's claim, measured: on the seeds both ran (optionally only `seeds`, e.g. the held-out ones), the
    share of `baseline`'s fine-grained gain that `method` keeps and the share of each of its drops that `method`
    leaves, as the ratio of means and with a t-interval over the per-seed ratios; and both methods' changes in
    points (x 100) beside the paper's Figure 1. Returns {"seeds", "ratios": {name: {...}}, "points": {...},
    "passed"} with "passed" judged by ACCEPTANCE on the ratio of means."""
    acc = acceptance(rows, method, baseline, seeds)
    out = {"method": method, "baseline": baseline, "seeds": acc["seeds"], "ratios": {}}
    for k in ACCEPTANCE:
        interval = _t_interval([acc["per_seed"][s][k] for s in acc["seeds"]], confidence)
        out["ratios"][k] = {**interval, "mean": acc[k], "target": ACCEPTANCE[k]}
    by = {(label(r), r["seed"]): r for r in rows if r.get("finetuned") and label(r) in (method, baseline)}
    out["points"] = {m: {a: 100 * float(np.mean([deltas(by[(m, s)])[a] for s in acc["seeds"]])) for a in AXES}
                     for m in (baseline, method)}
    out["passed"] = acc["passed"]
    return out


def winners(rows: list[dict], baseline: str = "toy-naive", constraint: float = 0.95) -> dict:
    """Which method wins on the test sets under each selection rule's own objective, from the rows a comparison
    ran under that rule: the mean rule maximises the mean of fine-grained and generic mAP@20; the constraint rule
    maximises generic mAP@20 among the methods whose fine-grained mAP@20 is at least `constraint` x the baseline's
    (a method without a constraint-rule row competes with its only choice). Each entry: the winner, its score, the
    runner-up and the paired interval winner minus runner-up (on the seeds both ran), so a win within the seeds'
    noise says so."""
    fin = [r for r in rows if r.get("finetuned")]
    test = lambda r, a: r["finetuned"][AXES[a][0]][AXES[a][1]]  # noqa: E731
    base = [test(r, "fine") for r in fin if label(r) == baseline]
    if not base:
        raise ValueError(f"no finished {baseline} rows: the rules' winners are judged against it")
    floor = constraint * float(np.mean(base))
    by_rule = {"mean": {}, "constraint": {}}
    for r in fin:
        tags = r.get("tags") or {}
        if "search_seed" in tags or r["method"] == baseline:
            continue
        rule = "constraint" if tags.get("rule") == "constraint" else "mean"
        by_rule[rule].setdefault(r["method"], []).append(r)
    for m, rs in by_rule["mean"].items():  # one choice for both rules
        by_rule["constraint"].setdefault(m, rs)
    score = {"mean": lambda r: (test(r, "fine") + test(r, "generic")) / 2, "constraint": lambda r: test(r, "generic")}
    out = {}
    for rule, methods in by_rule.items():
        ranked = []
        for m, rs in methods.items():
            if rule == "constraint" and np.mean([test(r, "fine") for r in rs]) < floor:
                continue
            ranked.append((float(np.mean([score[rule](r) for r in rs])), m, {r["seed"]: score[rule](r) for r in rs}))
        ranked.sort(reverse=True)
        if not ranked:
            out[rule] = {"winner": None}
            continue
        entry = {"winner": ranked[0][1], "score": ranked[0][0], "ranking": [(m, s) for s, m, _ in ranked]}
        if len(ranked) > 1:
            a, b = ranked[0][2], ranked[1][2]
            common = sorted(set(a) & set(b))
            entry["runner_up"] = ranked[1][1]
            entry["margin"] = _t_interval([a[s] - b[s] for s in common])
            entry["margin"]["seeds"] = common
        if rule == "constraint":
            entry["floor"] = floor
        out[rule] = entry
    return out


def rank_correlation(rows: list[dict]) -> dict:
    """Does validation rank the runs as the test does? Spearman's rho between each final run's kept validation
    scores (what the selection saw) and its test scores: fine-grained, generic and their mean, over the runs and over
    the methods' means (a method with its rule's or search seed's tag counts apart, `label`). A validation that stands
    in for the test gives a high rho on the mean. Rows without test or validation scores are skipped."""
    from collections import defaultdict

    from scipy.stats import spearmanr
    keys = {"fine": ("fine_map@20", "in_domain"), "generic": ("generic_map@20", "generic_image")}
    per_run, by_method = [], defaultdict(list)
    for r in rows:
        if not (r.get("finetuned") and r.get("val")):
            continue
        s = {}
        for name, (val_key, group) in keys.items():
            s[f"val/{name}"], s[f"test/{name}"] = r["val"][val_key], r["finetuned"][group][f"map@{K}"]
        for split in ("val", "test"):
            s[f"{split}/mean"] = (s[f"{split}/fine"] + s[f"{split}/generic"]) / 2
        per_run.append(s)
        by_method[label(r)].append(s)
    means = [{k: float(np.mean([s[k] for s in ss])) for k in ss[0]} for ss in by_method.values()]
    out = {"runs": len(per_run), "methods": len(means)}
    for level, items in (("over runs", per_run), ("over method means", means)):
        out[level] = {name: float(spearmanr([s[f"val/{name}"] for s in items], [s[f"test/{name}"] for s in items])
                                  .statistic) if len(items) > 2 else float("nan") for name in ("fine", "generic", "mean")}
    return out
