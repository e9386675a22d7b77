"""Gemma 3 (text): norms compute x̂·(1 + w), embeddings scaled by √hidden inside
embed_tokens, local (sliding-window) and global layers with their own rotary bases,
q_norm/k_norm, and four norms per layer: `post_attention_layernorm` normalises the
attention output, `pre_feedforward_layernorm` is what feeds gate/up."""

from edgellm.archs import Family, Smooth

BOOL, ARRAY = 7, 9  # GGUF value types


def sliding_pattern(config: dict) -> dict:
    """llama.cpp's gemma3 graph assumes every 6th layer global unless the GGUF lists each
    layer's kind (attention.sliding_window_pattern); its converter does not write the list,
    so a model with another pattern (a depth-pruned one, a tiny test model) ran with the
    wrong masks. Write it from the config's layer_types."""
    kinds = config.get("layer_types")
    if not kinds:
        return {}
    return {"gemma3.attention.sliding_window_pattern": {
        "type": ARRAY, "sub_type": BOOL, "value": [k == "sliding_attention" for k in kinds]}}

FAMILY = Family(
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    gguf_arch="gemma3",
    smooth=(
        Smooth("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Smooth("self_attn.v_proj", ("self_attn.o_proj",), heads=True),
        Smooth("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        Smooth("mlp.up_proj", ("mlp.down_proj",)),
    ),
    rope_types=("default", "linear"),
    norm_offset=1.0,
    gguf_extra=sliding_pattern,
)
