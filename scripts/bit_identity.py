"""Same short runs, two code trees: does a refactor change any bit of what training keeps?

  PYTHONPATH=/path/to/old/checkout python scripts/bit_identity.py old.json toy-naive toy-paper ...
  PYTHONPATH=.                      python scripts/bit_identity.py new.json toy-naive toy-paper ...
  python scripts/bit_identity.py --compare old.json new.json

Each preset runs on the smoke world for 12 target steps (validation every 6, LP-FT warm-up 4 where the preset has
one), one thread, no test evaluation; the sha256 of every kept tensor (image tower and head, in name order) and of
the run's validation metrics, kept step, update counts and post-hoc choice is written to the JSON file (a merge of
several runs first trains the runs it merges). --compare prints one line per preset and exits 1 when any differs.
"""
import hashlib
import json
import sys
import tempfile
from pathlib import Path


def hashes(presets: list[str]) -> dict:
    import torch
    torch.set_num_threads(1)
    import infusing_kit
    from infusing_kit.protocol.experiment import run_experiment
    from infusing_kit.protocol.presets import PRESETS
    out = {}
    for preset in presets:
        d = Path(tempfile.mkdtemp()) / preset
        extra = {"lp_ft_steps": 4} if PRESETS[preset].smoke_train.lp_ft_steps else {}
        m = run_experiment(preset, d, smoke=True, progress=False, test=False,
                           overrides={"steps": 12, "eval_every": 6, **extra})
        sd = torch.load(d / "model.pt", map_location="cpu", weights_only=True)
        h = hashlib.sha256()
        for part in ("visual", "head"):
            for k in sorted(sd[part]):
                h.update(k.encode())
                h.update(sd[part][k].numpy().tobytes())
        h.update(json.dumps({k: m[k] for k in ("val", "best_step", "updates", "post_hoc_chosen")}, sort_keys=True,
                            default=str).encode())  # the kept step's validation and what a post-hoc step chose
        out[preset] = h.hexdigest()[:16]
        print(preset, out[preset], flush=True)
    return {"code": infusing_kit.__file__, "hashes": out}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"]:
        a, b = (json.loads(Path(p).read_text())["hashes"] for p in sys.argv[2:4])
        same = {k: a[k] == b.get(k) for k in a}
        for k in a:
            print(f"{k:24s} {a[k]} {b.get(k)} {'same' if same[k] else 'DIFFERENT'}")
        sys.exit(0 if all(same.values()) else 1)
    Path(sys.argv[1]).write_text(json.dumps(hashes(sys.argv[2:]), indent=1))
