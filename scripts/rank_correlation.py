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
from pathlib import Path

from infusing_kit.protocol.results import rank_correlation


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
    out = rank_correlation(rows)
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
