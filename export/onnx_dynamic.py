"""Dynamic INT8 ONNX (`weights = "int8-dynamic"`): MatMulInteger with activations quantized
at run time, by ONNX Runtime's own `quantize_dynamic`.

The fp32 graph the builder writes is quantized per output channel (int8 weights); each
MatMul's input is quantized to uint8 when the model runs, one scale per tensor
(DynamicQuantizeLinear). The lm_head stays float unless the recipe sets `lm_head_bits = 8`:
on SmolLM2 it is the matrix whose rounding costs most. One scale per activation tensor is
what outlier channels break, so run the `smoothquant` step first (README: its numbers).
`weights = "int8"` (MatMulNBits, int8 activations per block of 32) keeps more quality on
CPU; this is the layout for runtimes and accelerators that execute MatMulInteger.
"""

from __future__ import annotations

import logging
from pathlib import Path

LM_HEAD = "/lm_head/MatMul"  # the builder's name for the output projection


def quantize_dynamic_int8(fp32_dir: Path, target: Path, quantize_lm_head: bool) -> None:
    """Write `target`/model.onnx (+ .data) from the fp32 export in `fp32_dir` (the caller
    copies the tokenizer and genai config beside it)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on the root logger
    try:
        quantize_dynamic(fp32_dir / "model.onnx", target / "model.onnx", per_channel=True,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=[] if quantize_lm_head else [LM_HEAD],
                         use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
