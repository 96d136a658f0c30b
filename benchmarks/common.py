"""Shared measuring helpers for the benchmarks: timing, machine peaks, result lines."""

from __future__ import annotations

import json
import time

import torch


def timed(fn, repeat: int = 1) -> float:
    """Best wall-clock seconds of `repeat` calls of fn()."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(gib: float = 1.0) -> float:
    """Measured memory read bandwidth in bytes/s (sum over a tensor much larger than the caches)."""
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    seconds = timed(lambda: x.sum(), repeat=3)
    return x.numel() * 4 / seconds


def result_line(name: str, **fields) -> str:
    """The JSON line every benchmark prints last."""
    return json.dumps({"benchmark": name, **fields})
