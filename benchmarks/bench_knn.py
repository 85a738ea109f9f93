"""kNN search time, faiss IndexFlatIP vs torch matmul+topk, on this machine (one run, printed ratios).

  python benchmarks/bench_knn.py [--sizes 10000 100000] [--queries 10000] [--dim 512] [--k 20]

Both backends go through infusing_kit.metrics.knn_search; the result lists are checked to agree.
"""
import argparse
import time

import numpy as np
import torch

from infusing_kit.metrics import knn_search


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"torch threads: {torch.get_num_threads()}, device: cpu, dim {args.dim}, k {args.k}, best of {args.repeat}")
    print(f"{'index':>8} {'queries':>8} {'faiss s':>8} {'torch s':>8} {'torch/faiss time':>17}  agree")
    for n in args.sizes:
        x = rng.standard_normal((n, args.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q = x[: args.queries] if args.queries <= n else x
        self_search = args.queries >= n
        idx = None if self_search else x
        tf, (_, jf) = timed(lambda: knn_search(q, idx, k=args.k, backend="faiss"), args.repeat)
        tt, (_, jt) = timed(lambda: knn_search(torch.from_numpy(q), None if idx is None else torch.from_numpy(x),
                                               k=args.k, backend="torch"), args.repeat)
        agree = float((jf == jt).mean())
        print(f"{n:>8} {len(q):>8} {tf:>8.2f} {tt:>8.2f} {tt / tf:>17.2f}  {agree:.4f}")
    if torch.cuda.is_available():
        x = torch.nn.functional.normalize(torch.randn(max(args.sizes), args.dim, device="cuda"), dim=1)
        q = x[: args.queries]
        knn_search(q, x, k=args.k, backend="torch")
        torch.cuda.synchronize()
        t = time.perf_counter()
        knn_search(q, x, k=args.k, backend="torch")
        torch.cuda.synchronize()
        print(f"cuda torch: index {len(x)}, queries {len(q)}: {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
