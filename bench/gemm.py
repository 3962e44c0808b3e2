"""The machine's fp32 matmul peak, measured: the denominator of model FLOPs utilisation (MFU).

Run in a fresh process (``python -m bench.gemm --threads N``) so its thread count is set before any
parallel work, as in a trial's worker. A large square fp32 matmul is as close to the CPU's reachable
peak as PyTorch (MKL) gets; the best repetition is the peak, the median says how steady it was.
"""

from __future__ import annotations

import argparse
import json


def measure(threads: int, n: int = 2048, reps: int = 10) -> dict[str, float | int]:
    from src.hw import gemm_peak  # the planner (src.plan) measures the same peak

    return gemm_peak(threads, n, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    print(json.dumps(measure(a.threads, a.n, a.reps)))


if __name__ == "__main__":
    main()
