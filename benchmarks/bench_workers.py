"""Search throughput on this machine: one worker with all threads, or one worker per core with one thread each?

  python benchmarks/bench_workers.py [--preset toy-l2sp] [--trials 4] [--steps 60] [--smoke]

Runs the same `trials` search trials (the preset at its own settings, validation only, no weights kept: what a
search trial does) twice: (a) one after another in one process with all cores' threads, (b) split over one
process per core, one thread each, all at once. Prints both wall times and the ratio (trials per hour of b over a),
measured in this one run; the machine should be otherwise idle.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, json, torch
torch.set_num_threads(int(sys.argv[1]))
from infusing_kit.protocol.experiment import run_experiment
for out in json.loads(sys.argv[2]):
    run_experiment(sys.argv[3], out, smoke=sys.argv[5] == "1", progress=False, test=False, keep_weights=False,
                   overrides={"steps": int(sys.argv[4])})
"""


def _launch(threads: int, outs: list[str], args) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(threads), json.dumps(outs), args.preset,
                             str(args.steps), "1" if args.smoke else "0"], env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="toy-l2sp")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60, help="target steps per trial")
    ap.add_argument("--smoke", action="store_true", help="the smoke world (a quick check of this script)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    # warm the caches (the pretrained toy model and the world) so neither mode pays for them
    _launch(cores, [str(root / "warm")], argparse.Namespace(**{**vars(args), "steps": 2})).wait()
    t0 = time.time()
    _launch(cores, [str(root / f"a{i}") for i in range(args.trials)], args).wait()
    a = time.time() - t0
    t0 = time.time()
    procs = [_launch(1, [str(root / f"b{w}-{i}") for i in range(w, args.trials, cores)], args) for w in range(cores)]
    for p in procs:
        p.wait()
    b = time.time() - t0
    if any(p.returncode for p in procs):
        sys.exit("a worker failed")
    print(f"{args.trials} trials of {args.preset} ({args.steps} target steps), {cores} cores")
    print(f"  1 worker x {cores} threads: {a:.0f} s  ({3600 * args.trials / a:.1f} trials/h)")
    print(f"  {cores} workers x 1 thread:  {b:.0f} s  ({3600 * args.trials / b:.1f} trials/h)")
    print(f"  ratio (workers / threads): {a / b:.2f}x")


if __name__ == "__main__":
    main()
