"""Benchmark: build and measure a recipe (default: the demo) and print one table.

    python bench/run.py [RECIPE.toml] [--out bench-out] [--threads N]

Timings vary with the machine and its load, so they live here, never in a test. Each
variant is measured in its own process (see edgellm.runtimes.protocol); --remeasure is implied.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console

from edgellm.pipeline import run_recipe
from edgellm.recipe import builtin_recipe_path, load_recipe
from edgellm.report_markdown import cell

COLUMNS = [("name", "variant", "{}"), ("size_mb", "size MB", "{:.1f}"),
           ("bits_per_weight", "bpw", "{:.2f}"), ("ppl", "ppl", "{:.3f}"),
           ("ppl_delta_pct", "Δppl %", "{:+.2f}"), ("kl_mean", "KL", "{:.4f}"),
           ("top1_agreement", "top-1", "{:.1%}"), ("prefill_tps", "prefill tok/s", "{:.0f}"),
           ("decode_tps", "decode tok/s", "{:.1f}"), ("ttft_ms", "TTFT ms", "{:.0f}"),
           ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("parameters", "params M", "{:.1f}"),
           ("sparsity", "sparsity", "{:.0%}"), ("steps", "steps", "{}")]


def table(variants: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---:" if i else "---" for i in range(len(COLUMNS))) + "|"]
    for row in variants:
        lines.append("| " + " | ".join(cell(row, k, f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", type=Path, default=builtin_recipe_path("demo"))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    recipe = load_recipe(args.recipe)
    if args.threads:
        recipe.eval.threads = args.threads
    console = Console(stderr=True)
    report = run_recipe(recipe, args.out, console, remeasure=True)
    machine, ev = report["machine"], report["eval"]
    print(table(report["variants"]))
    print(f"\n{ev['tokens_scored']} scored tokens of {ev['text']}, ctx {ev['ctx']}; "
          f"decode {ev['decode_tokens']} tokens after a {ev['ctx']}-token prompt; "
          f"{machine['threads']} threads, OMP_WAIT_POLICY={machine['omp_wait_policy']}; "
          f"{machine['cpu']}, {machine['physical_cores']} cores.")


if __name__ == "__main__":
    main()
