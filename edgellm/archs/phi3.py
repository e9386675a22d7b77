"""Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj, partial rotary
(Phi-4-mini), LongRoPE scaling (short/long factors become GGUF's rope_factors tensors).

Only the two norm migrations of SmoothQuant apply (v and up are slices of fused
projections), and width pruning would have to slice inside the fused rows: refused."""

from edgellm.archs import Family, Smooth

FAMILY = Family(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    gguf_arch="phi3",
    smooth=(Smooth("input_layernorm", ("self_attn.qkv_proj",)),
            Smooth("post_attention_layernorm", ("mlp.gate_up_proj",))),
    rope_types=("default", "longrope"),
    width=False,
)
