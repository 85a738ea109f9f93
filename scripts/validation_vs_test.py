"""Does validation stand in for the test? The pretrained model and naive fine-tuning, scored on both, side by side.

  python scripts/signatures.py --world near --out runs/sig         # (makes runs/sig/near/toy-naive-s*)
  python scripts/signatures.py --world near-v1 --out runs/sig
  python scripts/validation_vs_test.py runs/sig/near-v1 runs/sig/near [--save results/FILE.json]

For each world folder: the pretrained model and every toy-naive run's kept checkpoint, on fine-grained validation
and test (all classes, and the classes of seen and of unseen shapes: their queries against the whole split, so the
two halves average to the whole), generic validation and test, and image-text R@1 (test only: selection never
sees text). Then, over the naive seeds: mean and SD of each score, naive's change on validation beside its change
on test (a validation that compresses forgetting has a ratio well under 1), and the SD of the selection scores
(fine-grained validation for naive, the mean of both validations for the regularized methods): the seed noise
against which the protocol judges differences.
"""
import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from infusing_kit.protocol.experiment import load_run
from infusing_kit.evaluation import text_side
from infusing_kit.identity import code_version
from infusing_kit.metrics import image_text_recall, retrieval_metrics
from infusing_kit.models import embed_images
from infusing_kit import world as W

K = 20


def fine_scores(vlm, split, unseen_shapes) -> dict:
    """mAP@20 on a fine-grained split: every query, the seen-shape classes' queries, the unseen ones'."""
    e = embed_images(vlm, split, progress=False)
    unseen = np.isin(W.shade_table()[0][split.labels], unseen_shapes)
    out = {"all": retrieval_metrics(e, split.labels, k=K, map_at_r=False)[f"map@{K}"]}
    for name, part in (("seen", ~unseen), ("unseen", unseen)):
        if part.any():
            idx = np.flatnonzero(part)
            out[name] = retrieval_metrics(e[idx], split.labels[idx], e, split.labels, k=K, map_at_r=False,
                                          query_in_index=idx)[f"map@{K}"]
    return out


def scores(vlm, world) -> dict:
    cfg = world.config
    g = lambda s: retrieval_metrics(embed_images(vlm, s, progress=False), s.labels, k=K, map_at_r=False)[f"map@{K}"]
    fv, ft = fine_scores(vlm, world.fine_val, cfg.fine_unseen_shapes), fine_scores(vlm, world.fine_test,
                                                                                  cfg.fine_unseen_shapes)
    t = world.text_test
    r = image_text_recall(embed_images(vlm, t, progress=False), text_side(vlm, t), t.caption_image)
    out = {f"val/fine_{k}": v for k, v in fv.items()} | {f"test/fine_{k}": v for k, v in ft.items()}
    out.update({"val/generic": g(world.generic_val), "test/generic": g(world.generic_test),
                "test/i2t_r@1": r["i2t_r@1"], "test/t2i_r@1": r["t2i_r@1"]})
    out["val/mean"] = (out["val/fine_all"] + out["val/generic"]) / 2
    return out


def one_world(folder: Path) -> dict:
    runs = sorted(folder.glob("toy-naive-s*"), key=lambda p: int(p.name.rsplit("-s", 1)[1]))
    if not runs:
        raise SystemExit(f"{folder}: no toy-naive-s* run folders (make them with scripts/signatures.py)")
    rows, pre, world, ident = {}, None, None, None
    for run in runs:
        m, tuned, pretrained, world = load_run(run)
        ident = ident or {k: m.get(k) for k in ("weights", "threads", "torch", "device_kind", "code")}
        pre = pre or scores(pretrained, world)
        rows[m["seed"]] = scores(tuned, world)
    keys = list(pre)
    arr = {k: np.array([r[k] for r in rows.values()]) for k in keys}
    summary = {k: {"pretrained": pre[k], "naive_mean": float(arr[k].mean()), "naive_sd": float(arr[k].std(ddof=1)),
                   "change": float(arr[k].mean() - pre[k])} for k in keys}
    ratio = {f"{split}_change_val_over_test": summary[f"val/{split}"]["change"] / summary[f"test/{split}"]["change"]
             for split in ("fine_all", "generic")}
    return {"world": asdict(world.config),
            "seeds": list(rows), "pretrained": pre, "naive": {str(s): r for s, r in rows.items()},
            "summary": summary, "ratios": ratio,
            "selection_sigma": {"naive (fine-grained validation)": summary["val/fine_all"]["naive_sd"],
                                "mean of both validations": summary["val/mean"]["naive_sd"]},
            "identity": ident}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", help="signature folders, one per world (runs/sig/near-v1 runs/sig/near)")
    ap.add_argument("--save", help="write every number as JSON here (refused if the file exists)")
    args = ap.parse_args()
    if args.save and Path(args.save).exists():
        ap.error(f"--save {args.save}: the file exists; results files are never overwritten, choose a new name")
    out = {Path(f).name: one_world(Path(f)) for f in args.folders}
    names = list(out)
    print("| score | " + " | ".join(f"{n}: pretrained | {n}: naive (mean ± SD) | {n}: change" for n in names) + " |")
    print("|---|" + "---|---|---|" * len(names))
    for k in out[names[0]]["summary"]:
        cells = []
        for n in names:
            s = out[n]["summary"].get(k)
            cells += ([f"{s['pretrained']:.3f}", f"{s['naive_mean']:.3f} ± {s['naive_sd']:.3f}", f"{s['change']:+.3f}"]
                      if s else ["", "", ""])
        print(f"| {k} | " + " | ".join(cells) + " |")
    for n in names:
        r, sig = out[n]["ratios"], out[n]["selection_sigma"]
        print(f"{n}: naive's change on validation / on test: fine-grained {r['fine_all_change_val_over_test']:.2f}, "
              f"generic {r['generic_change_val_over_test']:.2f}; selection-score SD over {len(out[n]['seeds'])} "
              f"seeds: fine-grained {sig['naive (fine-grained validation)']:.4f}, mean {sig['mean of both validations']:.4f}")
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps({"what": __doc__.splitlines()[0], "script": "scripts/validation_vs_test.py",
                                               "code": code_version(), "worlds": out}, indent=1) + "\n")
        print(f"wrote {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
