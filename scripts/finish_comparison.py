"""Turn a finished comparison into the kit's current results for a world: new registry files in results/, a report of
every table the comparison exists for, and the manifest (results/current.json) pointed at them.

  python scripts/finish_comparison.py runs/compare-v4 --world near --tag cpu-v4 \
      [--state results/in-progress/toy-compare-v4] [--far results/toy-comparison-cpu-v2.jsonl] [--dry-run]

Writes (each refused if it exists: results files are never overwritten):
  results/toy-comparison-{world}-{tag}.jsonl   the final runs (OUT/results.jsonl, as written)
  results/toy-trials-{world}-{tag}.jsonl       every search trial (validation only)
  results/toy-chosen-{world}-{tag}.json        the protocol's choices (OUT/chosen.json)
  results/toy-report-{world}-{tag}.json / .md  the table, points beside the paper's, paired intervals against the
                                              baseline and the combination, the claim on the final and the held-out
                                              seeds, each rule's winner, validation-vs-test rank correlation, and
                                              (with --far) both worlds side by side
then repoints results/current.json's `world` entries at them, and moves --state to results/superseded/ (it is not
a result). Commit what it prints. --dry-run prints the report and writes nothing.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

from infusing_kit.results import (RESULTS, claim, load_results, markdown_table, paired, paired_table, points_table,
                                  rank_correlation, summarise, winners, world_summary, worlds_table)



def posthoc_choices(folder: str | Path) -> list[dict]:
    """What each post-hoc final run chose on validation, from its metrics.json under folder (a comparison's --out or
    --state: runs/final/*/): the chosen candidate (alpha, LiNeS' alpha and beta, Model Stock's merge and ratio t, a
    greedy soup's kept ingredients), how many candidates it had, and the runs it merged besides the seed's own
    training (all start from the pretrained weights)."""
    out = []
    for path in sorted(Path(folder).glob("runs/final/*/metrics.json")):
        m = json.loads(path.read_text())
        if not m.get("post_hoc"):
            continue
        curve = m.get("post_hoc_curve", [])
        pick = next((r for r in curve if "ingredients" in r), None) or next(
            (r for r in curve if all(r.get(k) == v for k, v in m["val"].items() if k in r)), {})
        out.append({"method": m["preset"], "seed": m["seed"], "rule": m.get("tags", {}).get("rule", "mean"),
                    "chosen": {k: v for k, v in pick.items() if not k.endswith("map@20")},
                    "candidates": len([r for r in curve if "ingredients" not in r]) or len(curve),
                    "merged": [Path(x).parent.name for x in m.get("merged", [])]})
    return out


def report(rows: list[dict], chosen: dict, far: str | None, folder: str | Path | None = None) -> tuple[dict, str]:
    """Everything the closing note and the chapters quote, as JSON and as markdown. folder: the comparison's --out
    (or --state), for what its post-hoc runs chose."""
    protocol = chosen["study"]["protocol"]
    baseline = protocol.get("baseline", "toy-naive")
    summary = summarise(rows, baseline)
    methods = [s["method"] for s in summary]
    plain = [m for m in methods if "[" not in m]
    finals = [s for s in protocol.get("final_seeds", [0, 1, 2, 3, 4])]
    heldout = [s for s in protocol.get("heldout_seeds", [5, 6, 7])]
    out = {"baseline": baseline, "summary": summary,
           "paired_vs_baseline": {m: paired(rows, m, baseline) for m in methods if m != baseline},
           "paired_vs_combination": {m: paired(rows, m, "toy-paper") for m in methods if m != "toy-paper"},
           "claim": {}, "winners": winners(rows, baseline, protocol.get("constraint", 0.95)),
           "rank_correlation": rank_correlation(rows)}
    for name, seeds in (("final seeds", finals), ("held-out seeds", heldout)):
        try:
            out["claim"][name] = claim(rows, "toy-paper", baseline, seeds)
        except ValueError as e:
            out["claim"][name] = {"error": str(e)}
    md = ["## The table (test sets; mean ± SD over seeds)", markdown_table(summary), "",
          "## Points beside the paper's Figure 1", points_table(summary), "",
          f"## Paired differences against {baseline} (points, mean [95% interval])",
          paired_table(rows, plain, baseline), "",
          "## Paired differences against the combination (toy-paper)", paired_table(rows, plain, "toy-paper"), ""]
    md.append("## The paper's claim (toy-paper against naive): ratio of means [95% t-interval of per-seed ratios]")
    md.append("| seeds | gain kept (>= 85%) | generic drop left (<= 25%) | i2t drop left (<= 25%) | passed |")
    md.append("|---|---|---|---|---|")
    for name, c in out["claim"].items():
        if "error" in c:
            md.append(f"| {name} | {c['error']} | | | |")
            continue
        cells = [f"{r['mean']:.0%} [{r['low']:.0%}, {r['high']:.0%}]" for r in c["ratios"].values()]
        md.append(f"| {name} {c['seeds']} | " + " | ".join(cells) + f" | {c['passed']} |")
    md += ["", "## Each rule's winner on the test sets"]
    for rule, w in out["winners"].items():
        if w.get("winner") is None:
            md.append(f"- {rule} rule: no method qualifies")
            continue
        line = f"- {rule} rule: **{w['winner']}** ({w['score']:.4f})"
        if "runner_up" in w:
            m = w["margin"]
            line += (f", ahead of {w['runner_up']} by {m['mean']:+.4f} [{m['low']:+.4f}, {m['high']:+.4f}] on seeds "
                     f"{m['seeds']}" + (" (within the seeds' noise)" if m["low"] <= 0 <= m["high"] else ""))
        md.append(line)
    rc = out["rank_correlation"]
    md += ["", f"## Validation vs test, Spearman rho ({rc['runs']} runs of {rc['methods']} methods)",
           "| level | fine-grained | generic | mean |", "|---|---|---|---|"]
    md += [f"| {lv} | {rc[lv]['fine']:.2f} | {rc[lv]['generic']:.2f} | {rc[lv]['mean']:.2f} |"
           for lv in ("over runs", "over method means")]
    if folder is not None:
        out["posthoc"] = posthoc_choices(folder)
        md += ["", "## What each post-hoc run chose on validation (each starts from the pretrained weights)",
               "| method | seed | chosen | candidates | merged besides the seed's own training |", "|---|---|---|---|---|"]
        md += [f"| {c['method']} | {c['seed']} | " + ", ".join(f"{k} {v}" for k, v in c["chosen"].items())
               + f" | {c['candidates']} | {', '.join(c['merged']) or '-'} |" for c in out["posthoc"]]
    if far:
        out["two_worlds"] = {"far": far, "summaries": {"far": world_summary(far)}}
        near = {s["method"]: s for s in summary}
        md += ["", "## Two worlds (each method against its own world's naive; points, share kept / left)",
               worlds_table({"near": near, "far": out["two_worlds"]["summaries"]["far"]})]
    return out, "\n".join(md) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the comparison's --out folder (finished: its chosen.json has no 'stopped')")
    ap.add_argument("--world", required=True, choices=["near", "far"])
    ap.add_argument("--tag", required=True, help="names the new files, e.g. cpu-v4")
    ap.add_argument("--state", help="the comparison's --state folder, moved to results/superseded/ when done")
    ap.add_argument("--far", help="the far world's registry, for the two-worlds table")
    ap.add_argument("--results", default=str(RESULTS), help="the results folder (default: the kit's)")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    out, results = Path(args.out), Path(args.results)
    chosen_path = out / "chosen.json"
    if not chosen_path.exists():
        ap.error(f"{out}: no chosen.json; pass the --out folder of `python -m infusing_kit compare`")
    chosen = json.loads(chosen_path.read_text())
    if chosen.get("stopped"):
        ap.error(f"{out} has not finished ({chosen['stopped']}); run its compare command again until it exits 0")
    rows = load_results(out / "results.jsonl", smoke=False)
    data, md = report(rows, chosen, args.far, out)
    print(md)
    stem = f"toy-{{}}-{args.world}-{args.tag}"
    files = {"comparison": results / (stem.format("comparison") + ".jsonl"),
             "trials": results / (stem.format("trials") + ".jsonl"),
             "chosen": results / (stem.format("chosen") + ".json"),
             "report": results / (stem.format("report") + ".json")}
    taken = [str(p) for p in [*files.values(), files["report"].with_suffix(".md")] if p.exists()]
    if taken:
        ap.error(f"{', '.join(taken)} exist; results files are never overwritten: choose another --tag")
    if args.dry_run:
        return 0
    shutil.copy2(out / "results.jsonl", files["comparison"])
    shutil.copy2(chosen_path, files["chosen"])
    from infusing_kit.__main__ import main as kit
    if kit(["trials", "--storage", str(out / "search.db"), "--out", str(files["trials"])]) != 0:
        return 1
    files["report"].write_text(json.dumps({"registry": files["comparison"].name, **data}, indent=1, default=str)
                               + "\n")
    files["report"].with_suffix(".md").write_text(md)
    manifest = results / "current.json"
    m = json.loads(manifest.read_text())
    m["worlds"].setdefault(args.world, {}).update({k: p.name for k, p in files.items()})
    manifest.write_text(json.dumps(m, indent=1) + "\n")
    moved = []
    if args.state:
        dest = results / "superseded" / Path(args.state).name
        shutil.move(args.state, dest)
        moved = [args.state, str(dest)]
    print("wrote", ", ".join(str(p) for p in files.values()), "and repointed", manifest)
    print("commit: git add -A results" + (f"  (the state moved: {moved[0]} -> {moved[1]})" if moved else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
