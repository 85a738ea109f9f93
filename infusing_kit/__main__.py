"""Command line: a thin adapter from arguments to the library.

  python -m infusing_kit experiment --preset toy-naive [--smoke] [--seed N] --out DIR [--device cpu]
  python -m infusing_kit pretrain [--smoke] [--seed N]        # fill the toy-VLM cache
  python -m infusing_kit presets                              # list the presets
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infusing_kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("experiment", help="run a preset end to end and write DIR/metrics.json")
    exp.add_argument("--preset", required=True, help="a preset name (see `presets`)")
    exp.add_argument("--out", required=True, help="output folder; must not already hold a metrics.json")
    exp.add_argument("--smoke", action="store_true", help="tiny model, world and schedule (about a minute)")
    exp.add_argument("--seed", type=int, default=0, help="seed of the world, the toy pretraining and the fine-tuning")
    exp.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    pre = sub.add_parser("pretrain", help="pretrain the toy VLM into the cache (no-op when cached)")
    pre.add_argument("--smoke", action="store_true")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", default="cpu")
    sub.add_parser("presets", help="list the experiment presets")
    args = parser.parse_args(argv)

    from . import experiment  # imported late: `--help` stays fast
    if args.command == "presets":
        for name, p in experiment.PRESETS.items():
            print(f"{name:12s} {p.description}")
        return 0
    if args.command == "pretrain":
        from .pretrain import cache_path, load_pretrained_toy
        cfg = experiment.pretrain_config(args.seed, args.smoke)
        load_pretrained_toy(cfg.model, device=args.device, cfg=cfg)
        print(cache_path(cfg))
        return 0
    if args.preset not in experiment.PRESETS:
        parser.error(f"--preset {args.preset!r} is unknown; choose one of {sorted(experiment.PRESETS)}")
    try:
        m = experiment.run_experiment(args.preset, args.out, smoke=args.smoke, seed=args.seed, device=args.device)
    except FileExistsError as e:
        parser.error(str(e))
    summary = {when: {axis: {k: round(v, 3) for k, v in m[when][axis].items()} for axis in m[when]}
               for when in ("pretrained", "finetuned")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/metrics.json in {m['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
