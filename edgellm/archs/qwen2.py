"""Qwen2 / Qwen2.5: Llama's layout with q/k/v biases; NEOX rope (no permutation)."""

from edgellm.archs import LLAMA_SMOOTH, Family

FAMILY = Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    gguf_arch="qwen2",
    smooth=LLAMA_SMOOTH,
    rope_types=("default", "yarn"),
)
