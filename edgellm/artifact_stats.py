"""What a built artifact holds, read from disk: the bytes a user ships, and a model
folder's parameters and measured sparsity."""

from __future__ import annotations

import json
from pathlib import Path

from edgellm.artifacts import dir_size

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".data", ".ort")


def artifact_size(path: Path) -> int:
    """Bytes a user ships: the file (with ONNX external data), or a folder's model files
    (not tokenizer or configs)."""
    if path.is_file():
        external = path.with_name(path.name + ".data")  # ONNX weights stored beside the graph
        return path.stat().st_size + (external.stat().st_size if external.is_file() else 0)
    return dir_size(path, WEIGHT_SUFFIXES)


def model_stats(model_dir: Path) -> dict:
    """Parameters, and the measured sparsity of the decoder's weight matrices (the fraction
    that is exactly zero; None for a packed GPTQ checkpoint, whose zeros mean nothing)."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    bits = (config.get("quantization_config") or {}).get("bits")
    zeros, matrix_total = 0, 0
    plain: dict[str, int] = {}  # tensor stored as it is → its elements
    packed: dict[str, list] = {}  # linear → [qweight shape, g_idx length]
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                shape = handle.get_slice(name).get_shape()
                module, _, part = name.rpartition(".")
                if part in ("qweight", "g_idx") and bits:
                    packed.setdefault(module, [None, None])[part == "g_idx"] = shape
                elif part not in ("qzeros", "scales") or not bits:
                    plain[name] = _numel(shape)
                if name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2:
                    tensor = handle.get_tensor(name)
                    zeros += int((tensor == 0).sum())
                    matrix_total += tensor.numel()
    # a tied embedding GPTQ solved keeps its float weight beside its integers: counted once
    total = sum(n for name, n in plain.items()
                if not (name.endswith(".weight") and name.rpartition(".")[0] in packed))
    for qweight, g_idx in packed.values():
        # g_idx holds one entry per input, whatever the linear's own bits (a checkpoint
        # with several grids stores some linears 4-bit and others 8-bit)
        inputs = g_idx[0] if g_idx else qweight[0] * 32 // bits
        total += inputs * qweight[1]
    sparsity = zeros / matrix_total if matrix_total and not bits else None
    return {"parameters": total, "sparsity": sparsity}


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
