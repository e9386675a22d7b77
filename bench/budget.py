"""Benchmark: the size-vs-quality frontier of GGUF budgets (a type per tensor) against
llama.cpp's single types on the same model and text, and how long the budget export takes.

    python bench/budget.py [--model smollm2-135m] [--budgets 80,91.7,105.5,120]
                           [--max-tokens 4096] [--gptq] [--out bench-budget]

--gptq adds, per budget, the same plan with GPTQ's integers in it (about 4 min of GPTQ
per budget for SmolLM2 on 2 cores).

Every variant is built and measured by the ordinary pipeline in OUT (a second call with
other budgets reuses the Fisher pass and the sensitivity table, so only the first budget
pays for them; its build time is printed). Candidates exclude types with block minimums
(q4_1, q5_1, q4_k, q5_k): the built-in SmolLM2 ships Q4_1-rounded, which they recover.
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
CANDIDATES = ["q3_k", "q4_0", "q5_0", "q6_k", "q8_0"]
COLUMNS = [("name", "variant", "{}"), ("size_mb", "size MB", "{:.1f}"),
           ("bits_per_weight", "bpw", "{:.2f}"), ("ppl_delta_pct", "Δppl %", "{:+.2f}"),
           ("kl_mean", "KL", "{:.4f}"), ("predicted_kl", "predicted KL", "{:.4f}"),
           ("top1_agreement", "top-1", "{:.1%}"), ("decode_tps", "decode tok/s", "{:.1f}")]


def variants(budgets: list[float], gptq: bool = False) -> list[VariantSpec]:
    single = [VariantSpec(name=f"llama.cpp-{t}", export=ExportSpec(format="gguf", weights=t))
              for t in SINGLE_TYPES]
    single += [VariantSpec(name=f"llama.cpp-{t}-imatrix",
                           export=ExportSpec(format="gguf", weights=t, imatrix=True))
               for t in ("q4_0", "q5_0")]
    mixed = [VariantSpec(name=f"edgellm-budget-{b:g}",
                         export=ExportSpec(format="gguf", max_size_mb=b, candidates=CANDIDATES))
             for b in budgets]
    if gptq:
        mixed += [VariantSpec(name=f"edgellm-gptq-budget-{b:g}", compress=[{"method": "gptq"}],
                              export=ExportSpec(format="gguf", max_size_mb=b, candidates=CANDIDATES))
                  for b in budgets]
    return single + mixed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", default="80,91.7,105.5,120")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--text", default="wikitext-2-raw-test")
    parser.add_argument("--gptq", action="store_true", help="also GPTQ inside each budget")
    parser.add_argument("--out", type=Path, default=Path("bench-budget"))
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    budgets = [float(b) for b in args.budgets.split(",")]
    recipe = Recipe(model=ModelSpec(source=args.model),
                    eval=EvalSpec(text=args.text, max_tokens=args.max_tokens),
                    calibration=CalibrationSpec(samples=64), variant=variants(budgets, args.gptq))
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
