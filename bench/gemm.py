"""The machine's fp32 matmul peak, measured: the denominator of model FLOPs utilisation (MFU).

Run in a fresh process (``python -m bench.gemm --threads N``) so its thread count is set before any
parallel work, as in a trial's worker. A large square fp32 matmul is as close to the CPU's reachable
peak as PyTorch (MKL) gets; the best repetition is the peak, the median says how steady it was.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(threads: int, n: int = 2048, reps: int = 10) -> dict[str, float | int]:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(2):  # warm-up: page in, let MKL pick its kernels
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return {"gflops_peak": max(rates), "gflops_median": statistics.median(rates), "n": n, "reps": reps,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    print(json.dumps(measure(a.threads, a.n, a.reps)))


if __name__ == "__main__":
    main()
