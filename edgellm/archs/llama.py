"""Llama 1-3.x (and models reusing its graph): rope halves permuted into pairs for llama.cpp;
Llama 3.1+ rope scaling ("llama3") becomes GGUF's rope_freqs tensor."""

from edgellm.archs import LLAMA_SMOOTH, Family

FAMILY = Family(
    name="llama",
    architectures=("LlamaForCausalLM",),
    gguf_arch="llama",
    smooth=LLAMA_SMOOTH,
    rope_types=("default", "llama3", "linear", "yarn"),
)
