"""SmolLM3: Llama's layout with no rope in every 4th layer (`no_rope_layers`)."""

from edgellm.archs import LLAMA_SMOOTH, Family

FAMILY = Family(
    name="smollm3",
    architectures=("SmolLM3ForCausalLM",),
    gguf_arch="smollm3",
    smooth=LLAMA_SMOOTH,
    rope_types=("default", "yarn"),
    layer_lists=("layer_types", "no_rope_layers"),
)
