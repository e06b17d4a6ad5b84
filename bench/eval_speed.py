"""Speed of ``mmssl.metrics.evaluate`` against a bare chunked matmul + topk(50).

Run from the repository root:

    python bench/eval_speed.py                 # TikTok and Baby scale, median of 5 runs
    python bench/eval_speed.py --smoke-test    # tiny sizes, one run, finishes in seconds
    python bench/eval_speed.py --device cuda --runs 9 --chunk-size 4096
    python bench/eval_speed.py --threads 1      # e.g. on a CPU shared with other jobs

For each scale: random embeddings (d=64), a random train matrix (~10 items per user,
excluded) and a random validation matrix (1-4 items per user, the truth). Prints the median
time of (a) ``scores = U[chunk] @ I.T`` + ``topk(50)`` over all users, (b) ``evaluate`` over
all users (exclusion, exact tie order, all metrics at K in 10/20/50), and the ratio b/a
(target <= 1.5).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mmssl.metrics import evaluate  # noqa: E402

SCALES = {"tiktok": (9308, 6710), "baby": (19445, 7050)}


def random_csr(rng, n_users, n_items, lo, hi):
    lengths = rng.integers(lo, hi + 1, size=n_users)
    rows = np.repeat(np.arange(n_users), lengths)
    cols = rng.integers(0, n_items, size=rows.size)
    m = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(n_users, n_items))
    m.data[:] = 1.0
    return m


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_topk(U, I, k, chunk_size):
    out = []
    for s in range(0, U.shape[0], chunk_size):
        out.append(torch.topk(U[s:s + chunk_size] @ I.T, k, dim=1).indices)
    return out


def median_times(fns, runs, device):
    """Median wall time of each function; runs interleaved (a, b, a, b, ...) so that a
    changing machine load hits both alike. One warm-up call each."""
    for fn in fns:
        fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(runs):
        for t, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            sync(device)
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--scales", default="tiktok,baby", help="comma list of " + ",".join(SCALES))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--smoke-test", action="store_true", help="tiny sizes, one run")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    scales = {name: SCALES[name] for name in args.scales.split(",")}
    runs = args.runs
    if args.smoke_test:
        scales, runs = {"smoke": (700, 500)}, 1
    print(f"device={device} threads={torch.get_num_threads()} chunk_size={args.chunk_size} "
          f"d={args.dim} runs={runs} loadavg={os.getloadavg()[0]:.1f}")
    rng = np.random.default_rng(0)
    for name, (n_users, n_items) in scales.items():
        g = torch.Generator().manual_seed(0)
        U = torch.randn(n_users, args.dim, generator=g).to(device)
        I = torch.randn(n_items, args.dim, generator=g).to(device)
        train = random_csr(rng, n_users, n_items, 5, 15)
        val = random_csr(rng, n_users, n_items, 1, 4)
        a, b = median_times([lambda: bare_topk(U, I, 50, args.chunk_size),
                             lambda: evaluate(U, I, train, val, chunk_size=args.chunk_size)],
                            runs, device)
        res = evaluate(U, I, train, val, chunk_size=args.chunk_size)
        print(f"{name:7s} users={n_users} items={n_items} train_nnz={train.nnz} "
              f"val_nnz={val.nnz}: (a) matmul+topk50 {a * 1e3:8.1f} ms  "
              f"(b) evaluate {b * 1e3:8.1f} ms  ratio b/a = {b / a:.2f}  "
              f"[recall@20={res['recall@20']:.4f}]")


if __name__ == "__main__":
    main()
