"""Per-architecture parts of GGUF export: hparam keys and tensor transforms.

The official `gguf` package maps tensor names (`TensorNameMap`) and writes the file;
what it does not know is which HF config fields feed which GGUF keys, and llama's Q/K
row permutation. One small entry per architecture; llama (and models that reuse its
graph) first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from edgellm.errors import UserError


@dataclass(frozen=True)
class GGUFArch:
    arch: gguf.MODEL_ARCH
    write_hparams: Callable[[gguf.GGUFWriter, dict], None]
    transform: Callable[[str, np.ndarray, dict], np.ndarray]


def llama_rope_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores rotary halves split ([x0..x63 | x64..x127] per head); llama.cpp's llama graph
    expects them interleaved in pairs. Reorder the output rows of q/k projections."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default" or config.get("rope_scaling"):
        raise UserError(
            f"rope type '{rope_type}' is not supported by the GGUF exporter yet: "
            "export a model with default rope"
        )
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _llama_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)


def _llama_transform(name: str, data: np.ndarray, config: dict) -> np.ndarray:
    heads = config["num_attention_heads"]
    if name.endswith("self_attn.q_proj.weight"):
        return llama_rope_permute(data, heads)
    if name.endswith("self_attn.k_proj.weight"):
        return llama_rope_permute(data, config.get("num_key_value_heads") or heads)
    return data


ARCHITECTURES = {
    "LlamaForCausalLM": GGUFArch(gguf.MODEL_ARCH.LLAMA, _llama_hparams, _llama_transform),
}


def arch_for(config: dict) -> GGUFArch:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    known = ", ".join(ARCHITECTURES)
    raise UserError(
        f"architecture {names or config.get('model_type')} has no GGUF exporter yet "
        f"(supported: {known}): add an entry to edgellm/export/gguf_arch.py"
    )
