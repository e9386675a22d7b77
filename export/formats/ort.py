"""ORT format: the ONNX export converted for ONNX Runtime Mobile (Android, iOS)."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgellm.export.budget_spec import MIXED
from edgellm.export.formats import Format
from edgellm.export.formats.onnx import FORMAT as ONNX
from edgellm.export.formats.onnx import MATMUL_NBITS_OPTIONS, onnx_kind


class OrtFormat(Format):
    name = "ort"
    summary = "ONNX Runtime Mobile"
    # no size budget: the ORT file is larger than the ONNX model the budget would count
    weights = tuple(w for w in ONNX.weights if w != MIXED)
    lossless = "f32"
    runtimes = ONNX.runtimes
    build_tools = (*ONNX.build_tools, "onnxruntime")  # onnxruntime converts to ORT format
    options = MATMUL_NBITS_OPTIONS
    family_need = ONNX.family_need
    artifact = "ort"

    def opens_path(self, path: Path) -> Path | None:
        return path if onnx_kind(path) == self.name else None

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        from edgellm.export.onnx import convert_to_ort, export_onnx

        onnx_dir = export_onnx(model_dir, work / f"onnx-{name}", spec, work)
        try:
            return convert_to_ort(onnx_dir, self.artifact_path(staging), work)
        finally:
            shutil.rmtree(onnx_dir, ignore_errors=True)


FORMAT = OrtFormat()
