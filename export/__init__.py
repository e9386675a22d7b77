"""Export stage: turn an HF folder into a deployable artifact (GGUF, ONNX, ORT format).

`weights_for` says which weight types each recipe `export.format` can write.
"""

from __future__ import annotations

# torch int8: torchao dynamic INT8 applied when the runtime loads the folder
TORCH_WEIGHTS = ("f32", "int8")


def weights_for(fmt: str) -> tuple[str, ...]:
    """The weight types an export format accepts."""
    if fmt == "gguf":
        from edgellm.export.gguf import GGUF_WEIGHTS

        return GGUF_WEIGHTS
    if fmt in ("onnx", "ort"):
        from edgellm.export.onnx import ONNX_WEIGHTS

        return ONNX_WEIGHTS
    if fmt == "torch":
        return TORCH_WEIGHTS
    if fmt == "mlx":
        from edgellm.export.mlx import MLX_WEIGHTS

        return MLX_WEIGHTS
    return ()
