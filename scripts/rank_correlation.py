"""Does validation rank the runs as the test does? Spearman rank correlation between each final run's kept
validation scores and its test scores, over the runs and over the methods' means.

  python scripts/rank_correlation.py REGISTRY.jsonl [--save FILE]

Per registry row (a final run with test metrics): fine-grained, generic and their mean, on validation (the kept
checkpoint's, what the selection saw) and on test (mAP@20 each). A validation that stands in for the test ranks
the runs (and the methods) in the test's order: the comparison's goal is a correlation of at least 0.8 on the mean.
Rows without test metrics (search trials, smoke rows) are skipped.
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

KEYS = {"fine": ("fine_map@20", "in_domain"), "generic": ("generic_map@20", "generic_image")}


def scores(row: dict) -> dict:
    out = {}
    for name, (val_key, test_key) in KEYS.items():
        out[f"val/{name}"] = row["val"][val_key]
        out[f"test/{name}"] = row["finetuned"][test_key]["map@20"]
    for split in ("val", "test"):
        out[f"{split}/mean"] = (out[f"{split}/fine"] + out[f"{split}/generic"]) / 2
    return out


def correlations(rows: list[dict]) -> dict:
    per_run = [scores(r) for r in rows]
    by_method = defaultdict(list)
    for r, s in zip(rows, per_run):
        by_method[r["method"]].append(s)
    means = [{k: float(np.mean([s[k] for s in ss])) for k in ss[0]} for ss in by_method.values()]
    out = {"runs": len(per_run), "methods": len(means)}
    for level, items in (("over runs", per_run), ("over method means", means)):
        out[level] = {}
        for name in ("fine", "generic", "mean"):
            rho = spearmanr([s[f"val/{name}"] for s in items], [s[f"test/{name}"] for s in items]).statistic \
                if len(items) > 2 else float("nan")
            out[level][name] = float(rho)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("registry")
    ap.add_argument("--save", help="write the correlations as JSON here (refused if the file exists)")
    args = ap.parse_args()
    path = Path(args.registry)
    if not path.exists():
        ap.error(f"{path}: no such registry (a results .jsonl file written by `compare` or `experiment --registry`)")
    if args.save and Path(args.save).exists():
        ap.error(f"--save {args.save}: the file exists; results files are never overwritten, choose a new name")
    rows = [r for r in map(json.loads, path.read_text().splitlines())
            if not r.get("smoke") and r.get("finetuned") and r.get("val")]
    if len(rows) < 3:
        ap.error(f"{path}: {len(rows)} final runs with validation and test scores; need at least 3")
    out = correlations(rows)
    print(f"{out['runs']} runs of {out['methods']} methods ({path})")
    print("| Spearman rho, validation vs test | fine-grained | generic | mean |\n|---|---|---|---|")
    for level in ("over runs", "over method means"):
        c = out[level]
        print(f"| {level} | {c['fine']:.2f} | {c['generic']:.2f} | {c['mean']:.2f} |")
    if args.save:
        Path(args.save).write_text(json.dumps({"registry": str(path), **out}, indent=1) + "\n")
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
