"""Export stage: turn an HF folder into a deployable artifact (GGUF now; ONNX and MLX plug in here).

`EXPORTERS` maps a recipe's `export.format` to the weight types it can write.
"""

from __future__ import annotations

TORCH_WEIGHTS = ("f32",)


def weights_for(fmt: str) -> tuple[str, ...]:
    """The weight types an export format accepts."""
    if fmt == "gguf":
        from edgellm.export.gguf import GGUF_WEIGHTS

        return GGUF_WEIGHTS
    if fmt == "torch":
        return TORCH_WEIGHTS
    return ()
