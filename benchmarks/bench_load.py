"""Training on a machine other jobs share: how much slower, and which thread settings keep it from crawling?

  python benchmarks/bench_load.py [--preset toy-naive] [--steps 60] [--burners 2]

The same short training (the preset's full-size run cut to `steps` target steps, validation as the preset does it,
no test, no weights kept) runs in a fresh process under four settings, first on the idle machine and then while
`burners` busy loops (pure-Python, one core each) share the cores:
  default   torch's threads (one per core), OpenMP's default wait policy (threads spin at every barrier)
  passive   the same threads, OMP_WAIT_POLICY=PASSIVE (a thread waiting at a barrier sleeps instead of spinning)
  1 thread  OMP_NUM_THREADS=1 (nothing to wait for)
Prints each wall time and the ratios, measured in this one run (the machine should be otherwise idle: the burners
are the only load). The kernels of `make run` get the setting this benchmark supports (notebook_runner.KERNEL_ENV).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys
from infusing_kit.protocol.experiment import run_experiment
run_experiment(sys.argv[1], sys.argv[2], progress=False, test=False, keep_weights=False,
               overrides={"steps": int(sys.argv[3])})
"""
SETTINGS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "1 thread": {"OMP_NUM_THREADS": "1"}}


def one(preset: str, steps: int, env: dict) -> float:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, "-c", CHILD, preset, f"{d}/run", str(steps)], check=True,
                       env={**base, "TQDM_DISABLE": "1", **env})
    return time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="toy-naive")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--burners", type=int, default=2)
    args = ap.parse_args()
    one(args.preset, 2, {})  # warm: the pretrained toy model and the world are cached once
    times = {}
    for load in ("idle", f"{args.burners} busy loops"):
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)] \
            if load != "idle" else []
        try:
            for name, env in SETTINGS.items():
                times[(load, name)] = one(args.preset, args.steps, env)
                print(f"{load:14s} {name:9s} {times[(load, name)]:6.1f} s", flush=True)
        finally:
            for b in burners:
                b.kill()
    loaded = f"{args.burners} busy loops"
    print(f"\n{args.preset}, {args.steps} target steps, {os.cpu_count()} cores; ratios measured in this run:")
    for name in SETTINGS:
        print(f"  {name:9s} loaded / idle {times[(loaded, name)] / times[('idle', name)]:.2f}; "
              f"idle / idle default {times[('idle', name)] / times[('idle', 'default')]:.2f}; "
              f"loaded / loaded default {times[(loaded, name)] / times[(loaded, 'default')]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
