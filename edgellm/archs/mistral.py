"""Mistral: Llama's graph with an optional sliding window; llama.cpp runs it as "llama"."""

from edgellm.archs import LLAMA_SMOOTH, Family

FAMILY = Family(
    name="mistral",
    architectures=("MistralForCausalLM",),
    gguf_arch="llama",
    smooth=LLAMA_SMOOTH,
    rope_types=("default", "yarn"),
)
