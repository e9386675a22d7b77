"""Perplexity of MLX exports' weights where MLX has only its slow CPU backend (Linux).

    python bench/mlx_dequantized.py OUT/reference OUT/mlx-f16/mlx OUT/mlx-q4/mlx [--max-tokens 4096]

Each MLX folder is loaded with mlx-lm and every quantized layer is dequantized with MLX's
own `mx.dequantize` (the values its quantized matmuls multiply by); the float weights are
then scored in torch on the same token ids as the first argument, an HF folder (the
run's reference). Prints one table. It measures what the export's quantization costs,
not MLX's speed: run `edgellm eval` on a Mac for that.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def mlx_float_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load

    model, _ = load(str(folder))
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weight = mx.dequantize(module.weight, module.scales, module.biases,
                                   module.group_size, module.bits)
            tensors[f"{name}.weight"] = weight
        elif isinstance(module, (nn.Linear, nn.Embedding, nn.RMSNorm)):
            tensors[f"{name}.weight"] = module.weight
    return {k: torch.from_numpy(np.array(v.astype(mx.float32))) for k, v in tensors.items()}


def torch_model(reference: Path, state: dict | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if m != "lm_head.weight" or not model.config.tie_word_embeddings]
        if missing or unexpected:
            raise SystemExit(f"weights do not match the reference model: {missing[:3]} {unexpected[:3]}")
    return model


@torch.inference_mode()
def perplexity(model, ids: np.ndarray, ctx: int = 512) -> float:
    from edgellm.data import token_windows
    from edgellm.runtimes import nll_of_targets
    from edgellm.runtimes.protocol import perplexity as ppl

    total, count = 0.0, 0
    for window in token_windows(ids, ctx):
        logits = model(input_ids=torch.from_numpy(window.astype(np.int64))[None]).logits[0, :-1]
        total += nll_of_targets(logits.float().numpy(), window[1:])
        count += len(window) - 1
    return ppl(total, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference")
    parser.add_argument("mlx_folders", nargs="+")
    parser.add_argument("--text", default="wikitext-2-raw-test")
    parser.add_argument("--max-tokens", type=int, default=16384)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from edgellm.data import read_text, resolve_text, tokenize

    reference = Path(args.reference)
    text, _ = read_text(resolve_text(args.text))
    ids = tokenize(AutoTokenizer.from_pretrained(reference), text, args.max_tokens)
    base = perplexity(torch_model(reference), ids)
    print(f"| model | bits | ppl | Δppl % |\n|---|---:|---:|---:|\n| {reference} | 32 | {base:.4f} | +0.00 |")
    for folder in map(Path, args.mlx_folders):
        quant = json.loads((folder / "config.json").read_text()).get("quantization") or {}
        value = perplexity(torch_model(reference, mlx_float_state_dict(folder)), ids)
        print(f"| {folder} | {quant.get('bits', 16)} | {value:.4f} | {100 * (value / base - 1):+.2f} |")


if __name__ == "__main__":
    main()
