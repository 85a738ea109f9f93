"""Which methods win when the new skill is near what the model knows, and when it is far: the two built-in worlds'
registries side by side, each method against its own world's naive fine-tuning.

  python scripts/two_worlds.py --far results/toy-comparison-cpu-v2.jsonl [--near REGISTRY.jsonl] [--save FILE]

Per world and method (rows of that world's registry, final seeds only, every seed it has): the fine-grained gain in
points and the share of naive's gain it keeps, the generic and image-text drops in points and the share of naive's
drop each leaves (`results.summarise`); a method missing from one world shows an empty cell. The near world's
registry is the finished comparison's (`compare` writes OUT/results.jsonl); until it exists, only the far column
prints.
"""
import argparse
import json
import sys
from pathlib import Path

from infusing_kit.results import load_results, summarise


def world_summary(path: str) -> dict:
    if not Path(path).exists():
        raise SystemExit(f"{path}: no such registry (a results .jsonl file written by `compare`)")
    rows = [r for r in load_results(path, smoke=False) if r.get("finetuned")]
    base = next((r["method"] for r in rows if (r.get("tags") or {}).get("role") == "baseline"), "toy-naive")
    return {s["method"]: s for s in summarise(rows, baseline=base)}


def cell(s: dict | None) -> list[str]:
    if s is None:
        return [""] * 3
    pct = lambda x: "" if x != x else f"{100 * x:.0f}%"
    return [f"{100 * s['fine_mean']:+.1f} ({pct(s.get('gain_kept', float('nan')))})",
            f"{100 * s['generic_mean']:+.1f} ({pct(s.get('generic_drop_left', float('nan')))})",
            f"{100 * s['i2t_mean']:+.1f} ({pct(s.get('i2t_drop_left', float('nan')))})"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--far", required=True, help="the far world's registry (results/toy-comparison-cpu-v2.jsonl)")
    ap.add_argument("--near", help="the near world's registry (the v4 comparison's, when it has finished)")
    ap.add_argument("--save", help="write both summaries as JSON here (refused if the file exists)")
    args = ap.parse_args()
    if args.save and Path(args.save).exists():
        ap.error(f"--save {args.save}: the file exists; results files are never overwritten, choose a new name")
    worlds = {"far": world_summary(args.far)}
    if args.near:
        worlds["near"] = world_summary(args.near)
    methods = list(dict.fromkeys(m for w in worlds.values() for m in w))
    head = [f"{w}: {axis}" for w in worlds for axis in ("gain, points (kept)", "generic, points (left)",
                                                        "image-text R@1, points (left)")]
    print("| method | " + " | ".join(head) + " |\n|---|" + "---|" * len(head))
    for m in methods:
        print(f"| {m} | " + " | ".join(c for w in worlds.values() for c in cell(w.get(m))) + " |")
    print("(seeds per method: " + "; ".join(f"{w}: " + ", ".join(f"{m} {s['seeds']}" for m, s in ws.items())
                                            for w, ws in worlds.items()) + ")")
    if args.save:
        Path(args.save).write_text(json.dumps({"registries": {"far": args.far, "near": args.near},
                                               "worlds": worlds}, indent=1) + "\n")
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
