"""Benchmark: the size-vs-quality frontier of size budgets (a type per tensor) against the
format's own single types on the same model and text, and how long the budget export takes.

    python bench/budget.py [--format gguf|onnx|mlx] [--model smollm2-135m]
                           [--budgets 80,91.7,105.5,120] [--max-tokens 4096] [--gptq]
                           [--text wikitext-2-raw-test] [--out bench-budget]
                           [--candidates q3_k,q4_0,...] [--peers q4_0,q4_0-imatrix,...]
                           [--samples 64] [--autoround ITERS]

Peers: GGUF, llama.cpp's single types (q4_0/q5_0 also with the importance matrix); ONNX,
the onnxruntime-genai builder's int4 and int8; MLX, mlx-lm's q4 and q8 (groups of 64).
--gptq adds, per budget, the same plan with GPTQ's integers in it (every format; about
4 min of GPTQ per budget for SmolLM2 on 2 cores); --autoround ITERS the same with AutoRound's
integers (compress/autoround.py; about 11 s a SmolLM2 layer per 50 steps here).

Every variant is built and measured by the ordinary pipeline in OUT (a second call with
other budgets reuses the Fisher pass and the sensitivity table, so only the first budget
pays for them; its build time is printed). Candidates exclude types with block minimums
(q4_1, q5_1, q4_k, q5_k): the built-in SmolLM2 ships Q4_1-rounded, which they recover.
A model shipped in other types wants other candidates (`--candidates`; Gemma 3 270M
shipped Q4_K_M: Q5_0, Q4_K, Q6_K and Q8_0 tensors) and may take fewer peers (`--peers`).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from rich.console import Console

from edgellm.pipeline import build_in, measure_built, run_report, start_run
from edgellm.recipe import CalibrationSpec, EvalSpec, ExportSpec, ModelSpec, Recipe, VariantSpec
from edgellm.report_markdown import cell

SINGLE_TYPES = ("q3_k_m", "q4_0", "q4_k_m", "q5_0", "q5_k_m", "q6_k", "q8_0")
CANDIDATES = {"gguf": ["q3_k", "q4_0", "q5_0", "q6_k", "q8_0"], "onnx": None, "mlx": None}
DEFAULT_BUDGETS = {"gguf": "80,91.7,105.5,120", "onnx": "90,104,120", "mlx": "67.3,75.7,84.1"}
PEERS = {"onnx": [("builder-int4", "int4"), ("builder-int8", "int8")],
         "mlx": [("mlx-lm-q4", "q4"), ("mlx-lm-q8", "q8")]}
COLUMNS = [("name", "variant", "{}"), ("size_mb", "size MB", "{:.1f}"),
           ("bits_per_weight", "bpw", "{:.2f}"), ("ppl_delta_pct", "Δppl %", "{:+.2f}"),
           ("kl_mean", "KL", "{:.4f}"), ("predicted_kl", "predicted KL", "{:.4f}"),
           ("top1_agreement", "top-1", "{:.1%}"), ("decode_tps", "decode tok/s", "{:.1f}")]


def peers(fmt: str, chosen: list[str] | None = None) -> list[VariantSpec]:
    """The format's own types; for GGUF `chosen` names some of them (`q4_0`, `q4_0-imatrix`)."""
    if fmt != "gguf":
        return [VariantSpec(name=name, export=ExportSpec(format=fmt, weights=weights))
                for name, weights in PEERS[fmt]]
    names = chosen or [*SINGLE_TYPES, "q4_0-imatrix", "q5_0-imatrix"]
    return [VariantSpec(name=f"llama.cpp-{n}", export=ExportSpec(
        format="gguf", weights=n.removesuffix("-imatrix"), imatrix=n.endswith("-imatrix")))
        for n in names]


def variants(budgets: list[float], gptq: bool = False, fmt: str = "gguf",
             candidates: list[str] | None = None, chosen_peers: list[str] | None = None,
             autoround: int | None = None) -> list[VariantSpec]:
    def budget(b: float) -> ExportSpec:
        return ExportSpec(format=fmt, max_size_mb=b, candidates=candidates or CANDIDATES[fmt])

    mixed = [VariantSpec(name=f"edgellm-budget-{b:g}", export=budget(b)) for b in budgets]
    if gptq:
        mixed += [VariantSpec(name=f"edgellm-gptq-budget-{b:g}", compress=[{"method": "gptq"}],
                              export=budget(b)) for b in budgets]
    if autoround:
        mixed += [VariantSpec(name=f"edgellm-autoround-budget-{b:g}", export=budget(b),
                              compress=[{"method": "autoround", "iters": autoround}])
                  for b in budgets]
    return peers(fmt, chosen_peers) + mixed


def split(listed: str | None) -> list[str] | None:
    return listed.split(",") if listed else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=sorted(DEFAULT_BUDGETS), default="gguf")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", help="MB, comma-separated (default: per format)")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--text", default="wikitext-2-raw-test")
    parser.add_argument("--gptq", action="store_true", help="also GPTQ inside each budget")
    parser.add_argument("--candidates", help="the budget's types, comma-separated")
    parser.add_argument("--peers", help="GGUF single types to compare, comma-separated "
                        "(a -imatrix suffix: with the importance matrix)")
    parser.add_argument("--autoround", type=int, metavar="ITERS",
                        help="also AutoRound inside each budget, ITERS steps a block")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of 512")
    parser.add_argument("--out", type=Path, default=Path("bench-budget"))
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    budgets = [float(b) for b in (args.budgets or DEFAULT_BUDGETS[args.format]).split(",")]
    recipe = Recipe(model=ModelSpec(source=args.model),
                    eval=EvalSpec(text=args.text, max_tokens=args.max_tokens),
                    calibration=CalibrationSpec(samples=args.samples),
                    variant=variants(budgets, args.gptq, args.format, split(args.candidates),
                                     split(args.peers), args.autoround))
    console = Console(stderr=True)
    run = start_run(recipe, args.out, console)
    build_seconds = {}
    for variant in recipe.variant:
        start = time.perf_counter()
        key = build_in(run, variant)
        build_seconds[variant.name] = time.perf_counter() - start
        measure_built(run, variant, key)
    rows = sorted(run_report(run)["variants"][1:], key=lambda r: r["size_bytes"])
    print("| " + " | ".join(h for _, h, _ in COLUMNS) + " | build s |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(COLUMNS) + 1)) + "|")
    for row in rows:
        cells = [cell(row, k, f) for k, _, f in COLUMNS]
        print("| " + " | ".join(cells) + f" | {build_seconds[row['name']]:.0f} |")
    first = f"edgellm-budget-{budgets[0]:g}"
    print(f"\n{args.max_tokens} tokens of {args.text}; build s of {first} includes the Fisher "
          "pass and the sensitivity table (0 when cached from an earlier call).")


if __name__ == "__main__":
    main()
