"""Command line: a thin adapter from arguments to the library.

  python -m infusing_kit experiment --preset toy-naive [--smoke] [--seed N] --out DIR [--device cpu] [--resume]
  python -m infusing_kit experiment --config FILE.toml --out DIR [--resume]   # your model and data
  python -m infusing_kit export-world --out DIR [--seed N] [--smoke]          # the built-in world as files + configs
  python -m infusing_kit pretrain [--seed N]                  # fill the toy-VLM cache
  python -m infusing_kit presets                              # list the presets
  python -m infusing_kit search --preset NAME --storage runs/search.db [--jobs 2] [--final-seeds 0 1 2]
  python -m infusing_kit compare --out runs/compare [--presets ...] [--jobs 2]   # the whole comparison, resumable
  python -m infusing_kit trials --storage runs/search.db --out runs/trials.jsonl   # search trials as JSON lines
  python -m infusing_kit report --registry runs/results.jsonl [--figures figures/]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infusing_kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("experiment", help="run a preset end to end and write DIR/metrics.json")
    what = exp.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="a preset on the built-in world (see `presets`)")
    what.add_argument("--config", help="a TOML experiment file: your model and data (README, 'Your own model and data')")
    exp.add_argument("--out", required=True, help="output folder; must not already hold a metrics.json")
    exp.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    exp.add_argument("--smoke", action="store_true", help="a small world and a short schedule (the same model)")
    exp.add_argument("--seed", type=int, default=0, help="the fine-tuning's seed (in the far world also the world's "
                     "and the toy pretraining's)")
    exp.add_argument("--world", default="near", choices=("near", "far"),
                     help="the built-in world: near (the default) or far (the kit's first world)")
    exp.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    exp.add_argument("--registry", help="results file (JSON lines) to append this run to")
    pre = sub.add_parser("pretrain", help="pretrain the toy VLM into the cache (no-op when cached)")
    pre.add_argument("--smoke", action="store_true")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--device", default="cpu")
    sub.add_parser("presets", help="list the experiment presets")
    ex = sub.add_parser("export-world", help="write the built-in world as image files, split files and one config "
                        "per preset (running a config reproduces the built-in run)")
    ex.add_argument("--out", required=True)
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--smoke", action="store_true")
    ex.add_argument("--format", default="png", choices=("png", "jpg"), help="image files (png: lossless)")
    se = sub.add_parser("search", help="choose a preset's strengths on validation (Optuna, resumable)")
    se.add_argument("--preset", required=True)
    se.add_argument("--trials", type=int, default=None,
                    help="finished trials before the edge check (default 12 per searched field; at least 8 per field)")
    se.add_argument("--jobs", type=int, default=1, help="trials run at once (worker processes sharing the study)")
    se.add_argument("--storage", default="runs/search.db", help="SQLite file of the Optuna studies")
    se.add_argument("--out", default="runs/search", help="folder for the trials' runs")
    se.add_argument("--smoke", action="store_true")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--device", default="cpu")
    se.add_argument("--final-seeds", type=int, nargs="*", default=[],
                    help="then run the chosen configuration with these seeds, with test evaluation")
    se.add_argument("--registry", default="runs/results.jsonl", help="where the final runs are recorded")
    co = sub.add_parser("compare", help="the whole comparison: naive's learning rates and schedule, every preset's "
                        "search, final runs with test metrics, table (resumable: run it again to continue)")
    co.add_argument("--out", default="runs/compare", help="folder of the comparison (studies, runs, registry)")
    co.add_argument("--presets", nargs="*", help="presets besides toy-naive (default: all of `presets`)")
    co.add_argument("--jobs", type=int, default=1, help="runs at once (2 on 2 CPU cores; 8-16 on one large GPU)")
    co.add_argument("--device", default="cpu")
    co.add_argument("--smoke", action="store_true", help="tiny world and schedules (a check of the pipeline)")
    co.add_argument("--stop-after", type=int, choices=(1, 2, 3, 4), help="stop after this stage (resume later)")
    tr = sub.add_parser("trials", help="export the finished search trials of Optuna SQLite files as JSON lines")
    tr.add_argument("--storage", nargs="+", required=True, help="SQLite files written by `search`")
    tr.add_argument("--out", required=True, help="JSON-lines file to write; must not exist yet")
    rep = sub.add_parser("report", help="comparison table and figures from a results registry")
    rep.add_argument("--registry", default="runs/results.jsonl")
    rep.add_argument("--figures", default="figures", help="folder for figure PNG/SVG files")
    rep.add_argument("--smoke", action="store_true", help="summarise smoke runs instead of full ones")
    args = parser.parse_args(argv)

    from . import experiment  # imported late: `--help` stays fast
    if args.command == "presets":
        from .presets import NOT_IN_THE_TABLE
        for name, p in experiment.PRESETS.items():
            flags = ", ".join(f for f in (f"post hoc: {p.post_hoc}" if p.post_hoc else p.family,
                                          "uses the text tower" if p.text else "") if f)
            print(f"{name:24s} [{flags}] {p.description}")
        for name, why in NOT_IN_THE_TABLE.items():
            print(f"{'(' + name + ')':24s} [not in the table] {why}")
        return 0
    if args.command == "pretrain":
        from .pretrain import cache_path, load_pretrained_toy
        cfg = experiment.pretrain_config(args.seed, args.smoke)
        load_pretrained_toy(cfg.model, device=args.device, cfg=cfg)
        print(cache_path(cfg))
        return 0
    if args.command == "report":
        return _report(args)
    if args.command == "export-world":
        from .export import export_world
        try:
            paths = export_world(args.out, seed=args.seed, smoke=args.smoke, image_format=args.format)
        except FileExistsError as e:
            parser.error(str(e))
        print(f"wrote {len(paths)} configs to {Path(args.out) / 'configs'}")
        return 0
    if args.command == "compare":
        from .comparison import compare
        compare(args.out, presets=args.presets, jobs=args.jobs, device=args.device, smoke=args.smoke,
                stop_after=args.stop_after)
        return 0
    if args.command == "trials":
        from .search import trial_rows
        if Path(args.out).exists():
            parser.error(f"--out {args.out} exists; choose a new file (nothing was overwritten)")
        rows = [r for storage in args.storage for r in trial_rows(storage)]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} trials of {len({r['study'] for r in rows})} studies to {args.out}")
        return 0
    if args.command == "search" and args.preset not in experiment.PRESETS or (
            args.command == "experiment" and args.preset is not None and args.preset not in experiment.PRESETS):
        parser.error(f"--preset {args.preset!r} is unknown; choose one of {sorted(experiment.PRESETS)}")
    if args.command == "search":
        from .search import final_runs, search
        best = search(args.preset, args.storage, args.out, trials=args.trials, smoke=args.smoke, seed=args.seed,
                      device=args.device, jobs=args.jobs)
        print(json.dumps(best, indent=1))
        if args.final_seeds:
            final_runs(args.preset, best["params"], args.final_seeds, f"{args.out}/final", args.registry,
                       smoke=args.smoke, device=args.device)
            print(f"appended {len(args.final_seeds)} runs to {args.registry}")
        return 0
    from .distributed import init_from_env
    args.device = init_from_env(args.device)  # under torchrun: join the process group, one GPU per process
    try:
        if args.config:
            from .config import run_config
            if args.smoke or args.seed:
                parser.error("--smoke and --seed belong to --preset runs; a config sets its own seed and schedule")
            m = run_config(args.config, args.out, device=args.device, registry=args.registry, resume=args.resume)
        else:
            m = experiment.run_experiment(args.preset, args.out, smoke=args.smoke, seed=args.seed, device=args.device,
                                          registry=args.registry, resume=args.resume, world=args.world)
    except (FileExistsError, FileNotFoundError, PermissionError, ValueError) as e:
        parser.error(str(e))
    summary = {when: {axis: {k: round(v, 3) for k, v in m[when][axis].items()} for axis in m[when]}
               for when in ("pretrained", "finetuned")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}/metrics.json in {m['seconds']:.0f} s")
    return 0


def _report(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    from . import figures
    from .results import load_results, markdown_table, summarise
    summary = summarise(load_results(args.registry, smoke=args.smoke))
    if not summary:
        print(f"no finished runs in {args.registry}", file=sys.stderr)
        return 1
    print(markdown_table(summary))
    suffix = "-smoke" if args.smoke else ""
    paths = figures.save(figures.tradeoff(summary), f"{args.figures}/tradeoff{suffix}")
    paths += figures.save(figures.figure1(summary), f"{args.figures}/figure1{suffix}")
    print("figures:", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
