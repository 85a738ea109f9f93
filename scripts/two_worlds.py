"""Which methods win when the new skill is near what the model knows, and when it is far: the two built-in worlds'
registries side by side, each method against its own world's naive fine-tuning.

  python scripts/two_worlds.py --far results/toy-comparison-cpu-v2.jsonl [--near REGISTRY.jsonl] [--save FILE]

Per world and method (its main choice: the rows without a comparison's tags, every seed it has): the fine-grained gain in
points and the share of naive's gain it keeps, the generic and image-text drops in points and the share of naive's
drop each leaves (`results.summarise`); a method missing from one world shows an empty cell. The near world's
registry is the finished comparison's (`compare` writes OUT/results.jsonl); until it exists, only the far column
prints.
"""
import argparse
import json
import sys
from pathlib import Path

from infusing_kit.results import world_summary, worlds_table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--far", required=True, help="the far world's registry (results/toy-comparison-cpu-v2.jsonl)")
    ap.add_argument("--near", help="the near world's registry (the v4 comparison's, when it has finished)")
    ap.add_argument("--save", help="write both summaries as JSON here (refused if the file exists)")
    args = ap.parse_args()
    if args.save and Path(args.save).exists():
        ap.error(f"--save {args.save}: the file exists; results files are never overwritten, choose a new name")
    try:
        worlds = {"far": world_summary(args.far)}
        if args.near:
            worlds["near"] = world_summary(args.near)
    except FileNotFoundError as e:
        ap.error(str(e))
    print(worlds_table(worlds))
    print("(seeds per method: " + "; ".join(f"{w}: " + ", ".join(f"{m} {s['seeds']}" for m, s in ws.items())
                                            for w, ws in worlds.items()) + ")")
    if args.save:
        Path(args.save).write_text(json.dumps({"registries": {"far": args.far, "near": args.near},
                                               "worlds": worlds}, indent=1) + "\n")
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
