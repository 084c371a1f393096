"""Timers (CUDA-graph replay, eager with L2 flush, CPU perf_counter) and the weight-copy
rotation that keeps a timed weight out of L2."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

Timer = Callable[[Callable[[], object]], float]


def gpu_timer(quick: bool) -> Timer:
    """CUDA-graph replay (median ms per call): what a serving stack that captures its decode
    step sees; launch overhead of the Python wrappers is excluded for every variant alike.
    Callers rotate through weight copies larger than L2 so replays stream from HBM."""
    import triton.testing

    rep = 20 if quick else 40

    def timer(fn):
        return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))

    return timer


def eager_timer(quick: bool) -> Timer:
    """Eager launches with an L2 flush before each call (triton do_bench, median ms):
    includes each wrapper's Python / launch overhead."""
    import triton.testing

    rep = 20 if quick else 40

    def timer(fn):
        return float(triton.testing.do_bench(fn, warmup=5, rep=rep, return_mode="median"))

    return timer


def cpu_timer(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]



L2_ROTATE_BYTES = 256 * 2**20  # weight copies cycled per call: > 4x the 50-60 MB L2 of H100/H200
MAX_COPIES = 32


class Rotation:
    """Cycles through equally shaped weight copies: consecutive (graph-captured) calls read
    different memory, so a weight smaller than L2 is not served from L2 in a timing loop."""

    def __init__(self, items: list):
        self.items, self.i = items, 0

    def __call__(self):
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def n_copies(n: int, k: int, device: str) -> int:
    """Copies so the smallest form (packed int4) of one weight set spans L2_ROTATE_BYTES."""
    if device != "cuda":
        return 1
    return max(1, min(MAX_COPIES, math.ceil(L2_ROTATE_BYTES / (n * k / 2))))

