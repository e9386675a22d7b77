"""Qwen3: per-head RMSNorm on q and k (q_norm/k_norm), an explicit head_dim, no biases."""

from edgellm.archs import LLAMA_SMOOTH, Family

FAMILY = Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    gguf_arch="qwen3",
    smooth=LLAMA_SMOOTH,
    rope_types=("default", "yarn"),
)
