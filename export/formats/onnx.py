"""ONNX: a decoder with KV cache plus genai_config.json for onnxruntime(-genai), written by
export/onnx.py (the onnxruntime-genai model builder)."""

from __future__ import annotations

from pathlib import Path

from edgellm.export.formats import Format
from edgellm.export.onnx import ONNX_NEED, ONNX_WEIGHTS

# MatMulNBits options (int4/int8 weight-only): ExportSpec fields only ONNX exports read
MATMUL_NBITS_OPTIONS = ("block_size", "accuracy_level", "symmetric", "lm_head_bits")


class OnnxFormat(Format):
    name = "onnx"
    summary = "ONNX Runtime"
    weights = ONNX_WEIGHTS
    lossless = "f32"
    runtimes = ("onnxruntime",)
    build_tools = ("torch", "transformers", "onnx", "onnx-ir", "onnxruntime-genai")
    options = MATMUL_NBITS_OPTIONS
    family_need = ONNX_NEED
    artifact = "onnx"  # a folder: model + genai_config.json + tokenizer

    def opens_path(self, path: Path) -> Path | None:
        return path if onnx_kind(path) == self.name else None

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        from edgellm.export.onnx import export_onnx

        return export_onnx(model_dir, self.artifact_path(staging), spec, work)


def onnx_kind(path: Path) -> str | None:
    """'ort', 'onnx' or None for a model file or the folder holding one (an ORT-format model
    beside an ONNX one wins: it is the one converted for the device)."""
    is_file = path.suffix in (".onnx", ".ort") and path.is_file()
    is_dir = path.is_dir() and ((path / "model.onnx").is_file() or (path / "model.ort").is_file())
    if not (is_file or is_dir):
        return None
    folder = path.parent if is_file else path
    return "ort" if path.suffix == ".ort" or (folder / "model.ort").is_file() else "onnx"


FORMAT = OnnxFormat()
