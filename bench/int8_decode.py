"""Benchmark: what the torch int8 folder's decode path computes, token by token, against
fp32 torch: KL divergence and perplexity of weight-only INT8 (the scored windows' path),
the default decode step (fbgemm's INT8 kernel, the outlier channels in float: the
calibration's 16 largest where the CPU sums 8-bit products exactly, else the token's 8
largest), the outliers chosen per token, and the kernel on every channel.

    python bench/int8_decode.py [--model smollm2-135m] [--tokens 1024] [--out bench-int8]

The reference and the int8 folder are built by the ordinary pipeline in OUT; the tokens
are the first N of wikitext-2 raw test, decoded one at a time with the KV cache (the
report's perplexity scores windows at once, which takes the weight-only path).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from edgellm import torch_int8
from edgellm.models import load_folder_model
from edgellm.pipeline import build_in, start_run
from edgellm.recipe import EvalSpec, ExportSpec, ModelSpec, Recipe, VariantSpec


def log_probs(model, ids: torch.Tensor, one_by_one: bool) -> torch.Tensor:
    with torch.inference_mode():
        if not one_by_one:
            return torch.log_softmax(model(ids).logits[0].double(), -1)
        past, rows = None, []
        for i in range(ids.shape[1]):
            out = model(input_ids=ids[:, i:i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            rows.append(out.logits[0, -1])
        return torch.log_softmax(torch.stack(rows).double(), -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-int8"))
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    variant = VariantSpec(name="torch-int8", export=ExportSpec(format="torch", weights="int8"))
    recipe = Recipe(model=ModelSpec(source=args.model), eval=EvalSpec(max_tokens=args.tokens + 1),
                    variant=[variant])
    run = start_run(recipe, args.out, Console(stderr=True))
    build_in(run, variant)
    ids = torch.from_numpy(np.load(run.eval_input.ids_path)[:args.tokens + 1].astype(np.int64))[None]
    reference = log_probs(load_folder_model(args.out / "reference"), ids, one_by_one=False)
    int8 = load_folder_model(args.out / "torch-int8", runtime_quantization=True)
    paths = {"weight-only (windows)": (int8, False), "decode, outlier split (default)": (int8, True)}
    rows = {name: log_probs(model, ids, one) for name, (model, one) in paths.items()}
    linears = [m for m in int8.modules() if isinstance(m, torch_int8.Int8Linear)]
    kernels = {id(m.decode_kernel): m.decode_kernel for m in linears if m.decode_kernel}
    if any(k.fixed is not None for k in kernels.values()):
        for kernel in kernels.values():  # what CPUs without exact 8-bit products choose
            kernel.fixed = None
        rows["decode, outliers chosen per token"] = log_probs(int8, ids, one_by_one=True)
    for module in linears:  # every channel through the kernel
        module.split_outliers = False
    rows["decode, kernel on every channel"] = log_probs(int8, ids, one_by_one=True)
    targets = ids[0, 1:, None]

    def ppl(logp):
        return float(np.exp(-logp[:-1].gather(1, targets).mean().item()))

    base = ppl(reference)
    print("| path | KL from fp32 | ppl | Δppl % |\n|---|---:|---:|---:|")
    for name, logp in rows.items():
        kl = (reference.exp() * (reference - logp)).sum(-1).mean().item()
        print(f"| {name} | {kl:.4f} | {ppl(logp):.3f} | {100 * (ppl(logp) / base - 1):+.2f} |")
    print(f"\nfp32 ppl {base:.3f} on the first {args.tokens} tokens of wikitext-2 raw test, "
          "one sequence")


if __name__ == "__main__":
    main()
