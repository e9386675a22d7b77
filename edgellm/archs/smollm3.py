"""SmolLM3: Llama's layout with no rope in every 4th layer (`no_rope_layers`).

ONNX: onnxruntime-genai 0.18's builder turns rope off in a no-rope layer by sending it down
its separate rotary path, which on CPU fails (`KeyError: 'position_ids'`) and elsewhere
would rotate the layer anyway: refused (tests/test_families_onnx_mlx.py expects that)."""

from edgellm.archs import LLAMA_SMOOTH, Family

FAMILY = Family(
    name="smollm3",
    architectures=("SmolLM3ForCausalLM",),
    gguf_arch="smollm3",
    smooth=LLAMA_SMOOTH,
    rope_types=("default", "yarn"),
    layer_lists=("layer_types", "no_rope_layers"),
    onnx=False,
)
