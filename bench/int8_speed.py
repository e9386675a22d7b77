"""Benchmark: torch decode speed of the int8 folder against fp32, each mode in its own
process, through the torch runtime's own greedy decode (what the report's decode tok/s
measures: a ctx-long prompt, then one token per step with the KV cache).

    python bench/int8_speed.py [--model smollm2-135m] [--ctx 512] [--tokens 64] [--repeats 3]

Modes: fp32 (the reference folder); int8 as the runtime loads it (q/k/v and gate/up decode
through one kernel per shared input, `torch_int8.SharedInput`); int8 with the outlier
channels chosen per token (what CPUs without exact 8-bit products do); int8 with every linear on
its own kernel (before the sharing); int8 with every channel through the kernel (no outlier
split: faster, less accurate, see bench/int8_decode.py). The folders are built by the
ordinary pipeline in OUT. Prints one table: decode tok/s (median of the repeats), its ratio
to fp32, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODES = ("fp32", "int8", "int8, outliers chosen per token", "int8, each linear on its own",
         "int8, no outlier split")


def time_mode(mode: str, folder: Path, ids_path: Path, ctx: int, tokens: int,
              repeats: int, threads: int) -> dict:
    """In this process: load the folder as the torch runtime does, decode, time it."""
    import numpy as np

    from edgellm import torch_int8
    from edgellm.runtimes.protocol import peak_rss_mb
    from edgellm.runtimes.pytorch import TorchRuntime

    if mode == "int8, each linear on its own":
        torch_int8.share_decode_inputs = lambda model: 0
    runtime = TorchRuntime(str(folder), threads, ctx)
    for module in runtime.model.modules():
        if not isinstance(module, torch_int8.Int8Linear):
            continue
        if mode == "int8, no outlier split":
            module.split_outliers = False
        if mode == "int8, outliers chosen per token" and module.decode_kernel is not None:
            module.decode_kernel.fixed = None
    prompt = np.load(ids_path)[:ctx]
    runtime.generate(prompt[:8], 4)  # warm-up, as the pipeline's latency phase does
    speeds = []
    for _ in range(repeats):
        timed = runtime.generate(prompt, tokens)
        speeds.append((len(timed.tokens) - 1) / timed.decode_s)
    return {"decode_tps": statistics.median(speeds), "peak_rss_mb": peak_rss_mb()}


def build(model: str, ctx: int, out: Path) -> tuple[Path, Path, Path]:
    """The reference and int8 folders, and the evaluation token ids, via the pipeline."""
    from rich.console import Console

    from edgellm.pipeline import build_in, start_run
    from edgellm.recipe import EvalSpec, ExportSpec, ModelSpec, Recipe, VariantSpec

    variant = VariantSpec(name="torch-int8", export=ExportSpec(format="torch", weights="int8"))
    recipe = Recipe(model=ModelSpec(source=model), eval=EvalSpec(max_tokens=ctx, ctx=ctx),
                    variant=[variant])
    run = start_run(recipe, out, Console(stderr=True))
    build_in(run, variant)
    return out / "reference", out / "torch-int8", run.eval_input.ids_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-int8"))
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the child's
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.mode:
        print(json.dumps(time_mode(args.mode, args.folder, args.ids, args.ctx, args.tokens,
                                   args.repeats, args.threads)))
        return
    reference, int8, ids = build(args.model, args.ctx, args.out)
    rows = {}
    for mode in MODES:
        folder = reference if mode == "fp32" else int8
        child = subprocess.run([sys.executable, __file__, "--mode", mode, "--folder", folder,
                                "--ids", ids, "--ctx", str(args.ctx), "--tokens", str(args.tokens),
                                "--repeats", str(args.repeats), "--threads", str(args.threads)],
                               capture_output=True, text=True, check=True)
        rows[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    base = rows["fp32"]["decode_tps"]
    print("| torch | decode tok/s | × fp32 | peak RSS MB |\n|---|---:|---:|---:|")
    for mode, row in rows.items():
        print(f"| {mode} | {row['decode_tps']:.1f} | {row['decode_tps'] / base:.2f} | "
              f"{row['peak_rss_mb']:.0f} |")
    print(f"\n{args.model}, {args.threads} threads, {args.tokens} tokens decoded after a "
          f"{args.ctx}-token prompt (wikitext-2 raw test), median of {args.repeats}")


if __name__ == "__main__":
    main()
