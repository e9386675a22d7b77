"""Benchmark: GPTQ with and without activation-aware scaling (`awq`) on a built-in model.

    python bench/awq.py [--model smollm2-135m|gemma3-270m] [--grids q4_0 q5_0] [--samples 128]
                        [--texts wikitext-2-raw-test PATH] [--max-tokens 16384] [--out bench-awq]

Each grid is solved twice on the same calibration windows of wikitext-2 valid (the
pipeline's GPTQ step, in this process: solve seconds beside each row), and every checkpoint
is scored in torch on its dequantized weights (the values the GGUF, ONNX and MLX exports
carry bit for bit) against the float model on the same token ids, windows of 512: Δppl
and the exact KL divergence of the next-token distributions, per text (windows start with
BOS where the tokenizer adds one, as the report's do). A rerun reuses the checkpoints
already in OUT.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console


def solve(model_dir: Path, dest: Path, grid: str, awq: bool, samples: int, console) -> float:
    """Seconds GPTQ took (0 when `dest` already holds the checkpoint)."""
    from edgellm.compress import Context, apply_step
    from edgellm.recipe import CalibrationSpec

    if (dest / "config.json").exists():
        return 0.0
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    start = time.perf_counter()
    apply_step({"method": "gptq", "grid": grid, "awq": awq}, model_dir, staging,
               Context(calibration=CalibrationSpec(samples=samples), console=console))
    staging.rename(dest)
    return time.perf_counter() - start


@torch.inference_mode()
def score(models: list, ids: np.ndarray, bos: int | None, ctx: int = 512) -> list[tuple]:
    """(perplexity, mean KL from the first model) of each model, window by window: only one
    window's distributions are held (Gemma's 262k vocabulary would not fit otherwise)."""
    from edgellm.data import token_windows

    nll, kl, count = np.zeros(len(models)), np.zeros(len(models)), 0
    for window in token_windows(ids, ctx, bos=bos):
        tokens = torch.from_numpy(window.astype(np.int64))[None]
        reference = None
        for index, model in enumerate(models):
            logp = torch.log_softmax(model(input_ids=tokens).logits[0, :-1].double(), dim=-1)
            nll[index] -= logp.gather(1, tokens[0, 1:, None]).sum().item()
            if reference is None:
                reference = logp
            else:
                kl[index] += (reference.exp() * (reference - logp)).sum().item()
        count += len(window) - 1
    return [(float(np.exp(n / count)), k / count) for n, k in zip(nll, kl, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", nargs="+", default=["q4_0", "q5_0"],
                        choices=["q4_0", "q5_0", "q8_0", "nbits"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--texts", nargs="+", default=["wikitext-2-raw-test"])
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=Path("bench-awq"))
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers import AutoTokenizer

    from edgellm.data import read_text, resolve_text, tokenize
    from edgellm.models import load_folder_model, resolve_source
    from edgellm.run_checks import prepare_out_dir
    from edgellm.source_meta import bos_of_folder
    from edgellm.standalone import _hf_folder

    console = Console(stderr=True)
    prepare_out_dir(args.out)
    model_dir = _hf_folder(resolve_source(args.model), args.out, console)
    variants = {}
    for grid in args.grids:
        for awq in (False, True):
            dest = args.out / f"gptq-{grid}-{'awq' if awq else 'plain'}"
            variants[dest] = (grid, awq, solve(model_dir, dest, grid, awq, args.samples, console))
            console.print(f"wrote {dest}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bos = bos_of_folder(model_dir, tokenizer)
    models = [load_folder_model(folder) for folder in (model_dir, *variants)]
    rows = []
    for name in args.texts:
        text, _ = read_text(resolve_text(name))
        ids = tokenize(tokenizer, text, args.max_tokens)
        (base, _), *scored = score(models, ids, bos)
        for (grid, awq, seconds), (ppl, kl) in zip(variants.values(), scored, strict=True):
            rows.append(f"| {Path(name).name} | {grid} | {'on' if awq else 'off'} | "
                        f"{100 * (ppl / base - 1):+.2f} | {kl:.4f} | {seconds:.0f} |")
    print(f"{args.model}, {args.max_tokens} tokens per text, calibration {args.samples}×512 "
          "of wikitext-2 valid")
    print("| text | grid | awq | Δppl % | KL | solve s (0: reused) |\n|---|---|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
