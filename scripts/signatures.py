"""The near world against the targets of a world that forgets the way a real VLM does, on fine-tuning seeds no
choice ever used (the comparison searched on 0, calibrated on 0-2, tests on 0-7).

  python scripts/signatures.py [--seeds 10 11 12 13 14] [--world near] [--out runs/signatures] [--save FILE]

Per seed: naive fine-tuning at its validation-chosen settings (`toy-naive`), test metrics before and
after; then the known signatures of real CLIP fine-tuning, measured: WiSE-FT at alpha 0.5 (Wortsman et al. 2022:
most of the gain with much of the knowledge), the uniform average of two fine-tuning seeds (model soups: the
average keeps most of the gain), LP-FT's distortion of generic features against naive's (Kumar et al. 2022: less),
at its preset's settings, read as the teacher agreement of the kept checkpoint (mean cosine to the pretrained embeddings of generic
validation images). Prints one table, targets against measured; runs are reused from --out. The two-seed
average pairs each seed with the next one in --seeds (the last with the first). --save writes the table as data (one
JSON file: the targets, every seed's values, the world, the code version and the runs' identity).
"""
import argparse
import json
from pathlib import Path

import numpy as np

from infusing_kit.methods import merges, posthoc
from infusing_kit.protocol import experiment
from infusing_kit.teaching.chapters import load_run

TARGETS = {  # (what, the target's test)
    "pretrained fine mAP@20": ("0.15-0.45 (off-the-shelf CLIP knows the domain in part)", lambda v: 0.15 <= v <= 0.45),
    "naive gain": (">= +0.25", lambda v: v >= 0.25),
    "naive fine val (kept)": ("< 0.95 (selection sees in-domain differences)", lambda v: v < 0.95),
    "generic mAP@20 lost": ("5-25% of pretrained", lambda v: 0.05 <= v <= 0.25),
    "i2t R@1 lost": ("10-40% of pretrained, never to chance", lambda v: 0.10 <= v <= 0.40),
    "WiSE-FT a=0.5: gain kept": ("most of naive's (> 50%)", lambda v: v > 0.5),
    "WiSE-FT a=0.5: generic drop left": ("much less than naive's (< 50%)", lambda v: v < 0.5),
    "two-seed average: gain kept": ("most of naive's (> 50%)", lambda v: v > 0.5),
    "LP-FT - naive: teacher agreement": ("> 0 (LP-FT distorts generic features less)", lambda v: v > 0),
}


def run(preset, out, seed, world):
    if not (Path(out) / "metrics.json").exists():
        experiment.run_experiment(preset, out, seed=seed, progress=False, resume=(Path(out) / "run").exists(),
                                  world=world)
    return load_run(out)


def merged_metrics(tuned, states, data):
    tuned.visual.load_state_dict(states)
    return experiment.evaluate(tuned, data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    ap.add_argument("--world", default="near", choices=experiment.WORLDS)
    ap.add_argument("--out", default="runs/signatures")
    ap.add_argument("--save", help="write the table as JSON here (refused if the file exists)")
    args = ap.parse_args()
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        ap.error("--seeds: at least two different seeds (the two-seed average pairs them)")
    if args.save and Path(args.save).exists():
        ap.error(f"--save {args.save}: the file exists; results files are never overwritten, choose a new name")
    out = Path(args.out) / args.world
    rows, fine = {}, lambda m: m["in_domain"]["map@20"]
    generic, i2t = (lambda m: m["generic_image"]["map@20"]), (lambda m: m["image_text"]["i2t_r@1"])
    naive = {s: run("toy-naive", out / f"toy-naive-s{s}", s, args.world) for s in args.seeds}
    kept = {s: posthoc.states_of(r.tuned) for s, r in naive.items()}  # (the merges below overwrite the towers)
    for s, (m, tuned, pretrained, data) in naive.items():
        pre, post = m["pretrained"], m["finetuned"]
        gain = fine(post) - fine(pre)
        theta0, theta1 = posthoc.states_of(pretrained), kept[s]
        wise = merged_metrics(tuned, merges.wise_ft(theta0, theta1, 0.5), data)
        other = kept[args.seeds[(args.seeds.index(s) + 1) % len(args.seeds)]]
        soup = merged_metrics(tuned, merges.average_states([theta1, other]), data)
        lpft = run("toy-lp-ft", out / f"toy-lp-ft-s{s}", s, args.world).metrics
        rows[s] = {"pretrained fine mAP@20": fine(pre), "naive gain": gain, "naive fine val (kept)": m["val"]["fine_map@20"],
                   "generic mAP@20 lost": 1 - generic(post) / generic(pre), "i2t R@1 lost": 1 - i2t(post) / i2t(pre),
                   "WiSE-FT a=0.5: gain kept": (fine(wise) - fine(pre)) / gain,
                   "WiSE-FT a=0.5: generic drop left": (generic(wise) - generic(pre)) / (generic(post) - generic(pre)),
                   "two-seed average: gain kept": (fine(soup) - fine(pre)) / gain,
                   "LP-FT - naive: teacher agreement": lpft["val"]["generic_agreement"] - m["val"]["generic_agreement"]}
    print("| signature | target | " + " | ".join(f"seed {s}" for s in args.seeds) + " | met |")
    print("|---|---|" + "---|" * len(args.seeds) + "---|")
    for key, (target, ok) in TARGETS.items():
        values = [rows[s][key] for s in args.seeds]
        print(f"| {key} | {target} | " + " | ".join(f"{v:.3f}" for v in values) +
              f" | {'yes' if all(ok(v) for v in values) else 'no'} |")
    m0 = naive[args.seeds[0]].metrics
    table = {"what": "the near world's signatures on fine-tuning seeds no choice used (scripts/signatures.py)",
             "world": args.world, "world_config": m0["world"], "seeds": args.seeds,
             "targets": {k: t for k, (t, _) in TARGETS.items()},
             "met": {k: all(ok(rows[s][k]) for s in args.seeds) for k, (_, ok) in TARGETS.items()},
             "values": {str(s): r for s, r in rows.items()},
             **{k: m0.get(k) for k in ("code", "weights", "threads", "torch", "device_kind")}}
    (out / "signatures.json").write_text(json.dumps(table, indent=1))
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {args.save}")


if __name__ == "__main__":
    main()
