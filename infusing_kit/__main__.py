"""Command line: a thin adapter from arguments to the library. Each subcommand is one small handler registered with
its parser (`COMMANDS`); one wrapper turns any error a user can fix into one line and exit code 2.

  python -m infusing_kit experiment --preset toy-naive [--smoke] [--seed N] [--world near|far] --out DIR [--resume]
  python -m infusing_kit experiment --config FILE.toml --out DIR [--resume]      # your model and data
  python -m infusing_kit check --config FILE.toml [--data]   # a config or study file checked, its settings shown
  python -m infusing_kit compare --out DIR [--presets ...] [--jobs 2] [--smoke]   # the built-in comparison, resumable
  python -m infusing_kit compare --config STUDY.toml --out DIR [--storage URL]   # your study, on one machine or many
  python -m infusing_kit search --preset NAME | --config STUDY.toml --method NAME [--storage DB|URL] [--jobs 2]
  python -m infusing_kit export-world --out DIR [--smoke]    # the built-in world as files, configs and a study file
  python -m infusing_kit pretrain [--world far --seed N]     # fill the toy-VLM cache
  python -m infusing_kit presets                             # list the methods
  python -m infusing_kit trials --storage DB|URL --out FILE  # search trials as JSON lines
  python -m infusing_kit report --registry FILE [--figures DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COMMANDS: dict = {}


def command(name: str, help: str):
    """Register a handler `f(args) -> int` and its argument setup `f.setup(parser)`."""
    def register(f):
        COMMANDS[name] = (help, f)
        return f
    return register


def _device(args) -> str:
    import torch
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available on this machine; use --device cpu")
    from .distributed import init_from_env
    return init_from_env(args.device)  # under torchrun: join the process group, one GPU per process


def _known_preset(name: str) -> str:
    from .protocol.presets import PRESETS
    if name not in PRESETS:
        raise ValueError(f"--preset {name!r} is unknown; choose one of {sorted(PRESETS)} (python -m infusing_kit "
                         "presets)")
    return name


@command("experiment", "run one preset or config end to end and write DIR/metrics.json")
def experiment_cmd(args) -> int:
    from .protocol import experiment
    if args.config and (args.smoke or args.seed or args.world != "near"):
        raise ValueError("--smoke, --seed and --world belong to --preset runs; a config sets its own seed and "
                         "schedule")
    device = _device(args)
    try:
        if args.config:
            from .protocol.config import run_config
            m = run_config(args.config, args.out, device=device, registry=args.registry, resume=args.resume)
        else:
            m = experiment.run_experiment(_known_preset(args.preset), args.out, smoke=args.smoke, seed=args.seed,
                                          device=device, registry=args.registry, resume=args.resume, world=args.world)
    except KeyboardInterrupt:
        raise ValueError(f"interrupted: the run in {args.out} keeps its last checkpoint; run the same command with "
                         "--resume to continue it") from None
    summary = {when: {axis: {k: round(v, 3) for k, v in m[when][axis].items()} for axis in m[when]}
               for when in ("pretrained", "finetuned")}
    from .protocol.testsets import summary as tests_summary
    print(json.dumps({**summary, **tests_summary(m)}, indent=1))  # with extra test sets: theirs and the averages
    print(f"wrote {args.out}/metrics.json in {m['seconds']:.0f} s")
    return 0


def _preset_or_config(p, preset: str, config: str) -> None:
    """--preset (the built-in world) or --config (a file), exactly one."""
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help=preset)
    what.add_argument("--config", help=config)


def _experiment_args(p):
    _preset_or_config(p, "a preset on the built-in world (see `presets`)",
                      "a TOML experiment file: your model and data (README, 'Your own model and data')")
    p.add_argument("--out", required=True, help="output folder; must not already hold a metrics.json")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--smoke", action="store_true", help="a small world and a short schedule (the same model)")
    p.add_argument("--seed", type=int, default=0, help="the fine-tuning's seed (in the far world also the world's "
                   "and the toy pretraining's)")
    p.add_argument("--world", default="near", choices=("near", "near-v1", "far"),
                   help="the built-in world (default near; near-v1: its "
                   "first split design, whose validation is easier than its test)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--registry", help="results file (JSON lines) to append this run to")


experiment_cmd.setup = _experiment_args


@command("check", "check a config or study file and print its resolved settings as JSON (no data is opened; "
                  "--data: every file it names must exist)")
def check_cmd(args) -> int:
    from .protocol.resolve import resolve_file
    print(json.dumps(resolve_file(args.config, data=args.data), indent=1, default=str))
    return 0


def _check_args(p):
    p.add_argument("--config", required=True, help="an experiment config or a study file (TOML)")
    p.add_argument("--data", action="store_true", help="also require every file the config names to exist")


check_cmd.setup = _check_args


def _study(args):
    from .protocol.study import Study, load_study
    if getattr(args, "config", None):
        return load_study(args.config)
    presets = getattr(args, "presets", None)
    for p in presets or ():
        _known_preset(p)
    return Study.builtin(args.smoke, presets)


@command("compare", "the whole comparison: naive's learning rates and schedule, every method's search, final runs "
                    "with test metrics, table (resumable: run it again to continue; several machines: --storage URL)")
def compare_cmd(args) -> int:
    from .protocol.comparison import compare
    chosen = compare(args.out, jobs=args.jobs, device=_device(args), study=_study(args), storage=args.storage,
                     stop_after=args.stop_after, budget=args.budget, state=args.state)
    return 3 if chosen.get("stopped") else 0


def _compare_args(p):
    p.add_argument("--out", default="runs/compare", help="folder of the comparison (studies, runs, registry)")
    p.add_argument("--config", help="a study file (docs/your-data.md, 'Reproduce the paper's protocol on your data')")
    p.add_argument("--presets", nargs="*", help="built-in comparison: presets besides toy-naive (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (2 on 2 CPU cores; 8-16 on one large GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--smoke", action="store_true", help="tiny world and schedules (a check of the pipeline)")
    p.add_argument("--storage", help="Optuna storage: an SQLite file (default OUT/search.db) or a database URL "
                   "(postgresql://user@host/db) that several machines share")
    p.add_argument("--stop-after", type=int, choices=(1, 2, 3, 4), help="stop after this stage (resume later)")
    p.add_argument("--budget", type=float, help="minutes after which no new trial or run starts: the call stops at "
                   "the next clean boundary (exit code 3) and the same command resumes")
    p.add_argument("--state", help="a tracked folder (e.g. results/in-progress/NAME) that keeps the resumable state "
                   "between sessions: read into --out when --out has none, written back when the call returns")


compare_cmd.setup = _compare_args


@command("search", "choose one method's settings on validation (Optuna, resumable)")
def search_cmd(args) -> int:
    from .protocol.search import final_runs, search
    if args.config and not args.method:
        raise ValueError("--config needs --method NAME (one of the study's methods)")
    study = _study(args)
    runner = study.runner
    method = args.method if args.config else _known_preset(args.preset)
    if method not in study.methods:
        raise ValueError(f"--method {method!r} is not a method of {args.config}: {list(study.methods)}")
    trials = args.trials if args.trials is not None else study.protocol.trials_of(method)  # a study's [study] trials
    best = search(method, args.storage, args.out, trials=trials, seed=args.seed, device=_device(args),
                  jobs=args.jobs, runner=runner)
    print(json.dumps(best, indent=1))
    if args.final_seeds:
        final_runs(method, best["params"], args.final_seeds, f"{args.out}/final", args.registry, device=args.device,
                   runner=runner)
        print(f"appended {len(args.final_seeds)} runs to {args.registry}")
    return 0


def _search_args(p):
    _preset_or_config(p, "a preset of the built-in world", "a study file; with --method")
    p.add_argument("--method", help="the study file's method to search")
    p.add_argument("--trials", type=int, default=None,
                   help="the study's whole budget of finished trials (default: the study file's [study] trials for "
                   "the method, else 12 for one searched field, 20 for two)")
    p.add_argument("--jobs", type=int, default=1, help="trials run at once (worker processes sharing the study)")
    p.add_argument("--storage", default="runs/search.db", help="SQLite file, or a database URL several machines share")
    p.add_argument("--out", default="runs/search", help="folder for the trials' runs (shared by all machines)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--final-seeds", type=int, nargs="*", default=[],
                   help="then run the chosen configuration with these seeds, with test evaluation")
    p.add_argument("--registry", default="runs/results.jsonl", help="where the final runs are recorded")


search_cmd.setup = _search_args


@command("pretrain", "pretrain the toy VLM into the cache (the near world's ships with the kit: a no-op)")
def pretrain_cmd(args) -> int:
    from .protocol.experiment import pretrain_config
    from .pretrain import cache_path, load_pretrained_toy, shipped_path
    cfg = pretrain_config(args.seed, world=args.world)
    load_pretrained_toy(cfg.model, device=args.device, cfg=cfg)
    print(shipped_path(cfg) if shipped_path(cfg).exists() and not cache_path(cfg).exists() else cache_path(cfg))
    return 0


def _pretrain_args(p):
    p.add_argument("--world", default="near", choices=("near", "far"))
    p.add_argument("--seed", type=int, default=0, help="far world only: the seed of its toy VLM")
    p.add_argument("--device", default="cpu")


pretrain_cmd.setup = _pretrain_args


@command("presets", "list the methods (presets), their family and whether they use the text tower")
def presets_cmd(args) -> int:
    from .protocol.presets import NOT_IN_THE_TABLE, PRESETS
    for name, p in PRESETS.items():
        flags = ", ".join(f for f in (f"post hoc: {p.post_hoc}" if p.post_hoc else p.family,
                                      "uses the text tower" if p.text else "") if f)
        print(f"{name:24s} [{flags}] {p.description}")
    for name, why in NOT_IN_THE_TABLE.items():
        print(f"{'(' + name + ')':24s} [not in the table] {why}")
    return 0


presets_cmd.setup = lambda p: None


@command("export-world", "write the built-in world as image files, split files, one config per preset and a study "
                         "file (running them reproduces the built-in runs)")
def export_cmd(args) -> int:
    from .protocol.export import export_world
    paths = export_world(args.out, seed=args.seed, smoke=args.smoke, image_format=args.format)
    print(f"wrote {len(paths)} configs to {Path(args.out) / 'configs'}")
    return 0


def _export_args(p):
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="the seed the configs fine-tune with")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--format", default="png", choices=("png", "jpg"), help="image files (png: lossless)")


export_cmd.setup = _export_args


@command("trials", "export the finished search trials of Optuna storages as JSON lines")
def trials_cmd(args) -> int:
    from .protocol.search import trial_rows
    if Path(args.out).exists():
        raise FileExistsError(f"--out {args.out} exists; choose a new file (nothing was overwritten)")
    rows = [r for storage in args.storage for r in trial_rows(storage)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} trials of {len({r['study'] for r in rows})} studies to {args.out}")
    return 0


def _trials_args(p):
    p.add_argument("--storage", nargs="+", required=True, help="SQLite files or database URLs written by `search`")
    p.add_argument("--out", required=True, help="JSON-lines file to write; must not exist yet")


trials_cmd.setup = _trials_args


@command("report", "comparison table and figures from a results registry")
def report_cmd(args) -> int:
    import matplotlib
    matplotlib.use("Agg")
    from .teaching import figures
    from .protocol.results import baseline_of, label, load_results, markdown_table, summarise
    rows = load_results(args.registry, smoke=args.smoke)
    present = sorted({label(r) for r in rows if r.get("finetuned")})
    if args.baseline is not None and present and args.baseline not in present:
        raise ValueError(f"--baseline {args.baseline!r} is not a method of {args.registry}; its methods: {present}")
    summary = summarise(rows, baseline=args.baseline or baseline_of(rows))
    if not summary:
        raise ValueError(f"no finished runs in {args.registry}")
    print(markdown_table(summary))
    from .protocol.testsets import markdown_table as tests_table
    extra = tests_table(rows)  # runs with extra test sets ([data.tests]): each set's and each average's change
    if extra:
        print("\nTest sets and their averages (fine-tuned minus pretrained, points):\n" + extra)
    suffix = "-smoke" if args.smoke else ""
    paths = figures.save(figures.tradeoff(summary), f"{args.figures}/tradeoff{suffix}")
    paths += figures.save(figures.figure1(summary), f"{args.figures}/figure1{suffix}")
    print("figures:", ", ".join(str(p) for p in paths))
    return 0


def _report_args(p):
    p.add_argument("--registry", default="runs/results.jsonl")
    p.add_argument("--figures", default="figures", help="folder for figure PNG/SVG files")
    p.add_argument("--smoke", action="store_true", help="summarise smoke runs instead of full ones")
    p.add_argument("--baseline", help="the baseline method (default: the registry's naive run, by its role)")


report_cmd.setup = _report_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infusing_kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help, handler) in COMMANDS.items():
        handler.setup(sub.add_parser(name, help=help))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError, OSError, ImportError, RuntimeError) as e:
        import os
        if os.environ.get("INFUSING_KIT_TRACEBACK"):
            raise
        more = "" if isinstance(e, (ValueError, FileExistsError, FileNotFoundError, PermissionError)) else \
            " (INFUSING_KIT_TRACEBACK=1 shows where it came from)"
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}{more}\n")
    except Exception as e:  # a storage's own errors (SQLAlchemy, Optuna): one line too
        import os
        if not type(e).__module__.startswith(("sqlalchemy", "optuna")) or os.environ.get("INFUSING_KIT_TRACEBACK"):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        parser.exit(2, f"{parser.prog} {args.command}: error: {type(e).__name__}: {first} (the Optuna storage; "
                       "INFUSING_KIT_TRACEBACK=1 shows where it came from)\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog} {args.command}: interrupted; run the same command again to continue "
                         "(finished work is kept)\n")


if __name__ == "__main__":
    sys.exit(main())
