"""The results registry: a JSON-lines file, one row per finished run (append-only: rows are never rewritten; a new
comparison writes a new file):
  {"method", "seed", "smoke", "overrides", "train": TrainConfig, "val": {...}, "best_step", "updates":
   {"target", "generic", "backbone"}, "pretrained": {...}, "finetuned": {...}, "warnings", "seconds", "device",
   "code", "run_dir", "finished", and on post-hoc rows "post_hoc_chosen" and "merged"}
`row_of` builds a row from a run's metrics.json (the one place rows are made), `append_result` writes it,
`load_results` / `load_trials` read registries and search trials back, `label` and `main_choices` name and pick
rows. results.py turns rows into tables and intervals.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def row_of(metrics: dict, run_dir: str | Path | None = None, **changes) -> dict:
    """The registry row of a run's metrics.json: the one function that builds the rows every table reads (what
    `append_result` writes, what a chapter compares). changes: fields replaced, e.g. a post-hoc step a chapter
    evaluates itself: row_of(naive, method="toy-wise-ft", finetuned=evaluate(merged, data))."""
    row = {"method": metrics["preset"], "seed": metrics["seed"], "smoke": metrics["smoke"],
           "overrides": metrics.get("overrides", {}), "train": metrics.get("train"), "val": metrics.get("val", {}),
           "best_step": metrics.get("best_step"), "updates": metrics.get("updates"),
           "pretrained": metrics["pretrained"], "finetuned": metrics["finetuned"], "warnings": metrics.get("warnings", []),
           "seconds": metrics.get("seconds"), "device": metrics.get("device"), "code": metrics.get("code"),
           "world": (metrics.get("world") or {}).get("kind", "far" if metrics.get("world") else None),
           "weights": metrics.get("weights"), "threads": metrics.get("threads"), "torch": metrics.get("torch"),
           "tags": metrics.get("tags", {}), "post_hoc": metrics.get("post_hoc"),
           "run_dir": str(run_dir) if run_dir else None, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    # only where present: extra test sets and their means (testsets.py); a post-hoc row's choice and the runs it merged
    row |= {k: metrics[k] for k in ("tests", "post_hoc_chosen", "merged") if metrics.get(k)}
    unknown = sorted(set(changes) - set(row) - {"tests", "post_hoc_chosen", "merged"})
    if unknown:
        raise ValueError(f"row_of: {unknown} are not fields of a registry row; choose from {sorted(row)}")
    return row | changes


def append_result(path: str | Path, metrics: dict, run_dir: str | Path | None = None) -> dict:
    """Append one finished run to the registry (creating it). Returns the row."""
    if "seconds" not in metrics or "train" not in metrics:
        raise ValueError(f"{path}: a registry row comes from a finished run's metrics.json (no 'seconds' or 'train')")
    row = row_of(metrics, run_dir)
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


def label(row: dict) -> str:
    """A registry row's name in tables: its method, with the comparison's tags (the constraint rule's choice, a
    second search seed) in brackets."""
    tags = row.get("tags") or {}
    extra = [("constraint rule" if tags.get("rule") == "constraint" else None),
             (f"search seed {tags['search_seed']}" if "search_seed" in tags else None)]
    extra = [e for e in extra if e]
    return row["method"] + (f" [{', '.join(extra)}]" if extra else "")


def main_choices(rows: list[dict], seeds: str | None = None) -> list[dict]:
    """Each method's main-choice rows with test metrics (not the constraint rule's or a second search seed's: those
    carry tags, `label`); seeds="shared": only the seeds every method ran, so that means compare like with like."""
    rows = [r for r in rows if r.get("finetuned") and label(r) == r["method"]]
    if seeds == "shared" and rows:
        keep = set.intersection(*({r["seed"] for r in rows if r["method"] == m} for m in {r["method"] for r in rows}))
        rows = [r for r in rows if r["seed"] in keep]
    return rows
