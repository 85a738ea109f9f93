"""Generic retention on combinations generic training has (other renders) vs combinations it never has.

  python scripts/seen_unseen.py RUN_DIR [RUN_DIR ...]      # run folders with metrics.json and model.pt

The generic test split holds both kinds (world.seen_in_generic_train); a method that only protects what it
replays would keep the seen part and lose the unseen one. Retrieval runs inside each part (queries and index
from the same part), pretrained vs the run's kept model.
"""
import sys

from infusing_kit import world as W
from infusing_kit.protocol.experiment import load_run
from infusing_kit.metrics import retrieval_metrics
from infusing_kit.models import embed_images


def main(run_dirs: list[str]) -> int:
    print("| run | part | images | pretrained mAP@20 | fine-tuned mAP@20 | change |\n|---|---|---|---|---|---|")
    for d in run_dirs:
        m, after, before, w = load_run(d)
        split = w.generic_test
        seen = W.seen_in_generic_train(w, split)
        emb = {k: embed_images(v, split.images, progress=False) for k, v in (("before", before), ("after", after))}
        for part, mask in (("seen combinations", seen), ("unseen combinations", ~seen)):
            a, b = (retrieval_metrics(emb[k][mask], split.labels[mask], k=20)["map@20"] for k in ("before", "after"))
            print(f"| {m['preset']} seed {m['seed']} | {part} | {int(mask.sum())} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
