"""Benchmark: ONNX Runtime decode with the KV cache vs recomputing the whole prefix.

    python bench/kv_cache.py ONNX_DIR [--context 256] [--tokens 16] [--threads 2]

ONNX_DIR is a folder `edgellm export --to onnx` wrote (or OUT/<variant>/onnx). Prints
one table: tok/s with the cache (one token per step), tok/s without it (every step runs
the full sequence with an empty cache), and their ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edgellm.runtimes import argmax
from edgellm.runtimes.ort import OrtRuntime


def recompute_tps(runtime: OrtRuntime, prompt: np.ndarray, tokens: int) -> float:
    ids = list(prompt)
    start = time.perf_counter()
    for _ in range(tokens):
        logits, _ = runtime.forward(np.array(ids), runtime.empty_cache(), len(ids))
        ids.append(argmax(logits[-1]))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    runtime = OrtRuntime(args.onnx_dir, args.threads, args.context)
    prompt = (np.arange(args.context) * 31 % 1000 + 100).astype(np.int64)
    runtime.generate(prompt[:8], 4)  # warm-up
    timed = runtime.generate(prompt, args.tokens + 1)
    cached = args.tokens / timed.decode_s
    uncached = recompute_tps(runtime, prompt, args.tokens)
    print("| context | tokens | cached tok/s | recompute tok/s | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {args.context} | {args.tokens} | {cached:.1f} | {uncached:.1f} | "
          f"{cached / uncached:.1f}× |")


if __name__ == "__main__":
    main()
