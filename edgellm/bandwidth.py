"""Memory bandwidth, measured, and each variant's decode ceiling from it.

Decoding one token reads every weight once, so a runtime can decode at most
bandwidth ÷ bytes of weights tokens per second: the memory-bandwidth ceiling that
llama.cpp's CPU decode approaches. The bandwidth is measured here by copying a buffer far
larger than the caches (bytes read + bytes written per second, best of several runs, one
thread: numpy's copy), so the ceiling is the machine's, not a datasheet's.
"""

from __future__ import annotations

import time

import numpy as np

COPY_BYTES = 256 << 20  # far beyond any L3 cache
REPEATS = 5


def copy_bandwidth_gbs(size: int = COPY_BYTES, repeats: int = REPEATS) -> float:
    """GB/s (10^9 bytes) moved by a large copy: read + write, best of `repeats`."""
    source = np.ones(size // 8, dtype=np.float64)
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best / 1e9


def decode_ceiling(bandwidth_gbs: float, weight_bytes: int) -> float:
    """Tokens per second if every decoded token only had to read all the weights once."""
    return bandwidth_gbs * 1e9 / weight_bytes
