"""GGUF: one file llama.cpp (and every app built on it) loads; written by export/gguf.py."""

from __future__ import annotations

from pathlib import Path

from edgellm.artifacts import sha256_json
from edgellm.export.formats import Format
from edgellm.export.gguf import FLOAT_TYPES, GGUF_WEIGHTS


class GgufFormat(Format):
    name = "gguf"
    summary = "llama.cpp"
    weights = GGUF_WEIGHTS
    lossless = "f16"
    runtimes = ("llama.cpp",)
    # llama-cpp-python: its quantizer and the converter extracted from its sdist
    build_tools = ("torch", "transformers", "gguf", "llama-cpp-python")
    memory_factor = 2.5
    options = ("imatrix",)
    artifact = "model.gguf"

    def check_spec(self, spec) -> str | None:
        if spec.imatrix and spec.weights in FLOAT_TYPES:
            return "imatrix only applies to quantized gguf weights (q8_0, q4_k_m, ...)"
        return None

    def opens_source(self, source) -> Path | None:
        return Path(source.path) / source.gguf_file if source.kind == "gguf" else None

    def intermediate_bytes(self, params: int, weights: str) -> int:
        return 0 if weights in FLOAT_TYPES else params * 4  # the f32 GGUF quantizing starts from

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        from edgellm.export.gguf import export_gguf

        imatrix = None
        if spec.imatrix:
            from edgellm.export.imatrix import compute_imatrix

            key = sha256_json(calibration.model_dump())[:12]
            imatrix = compute_imatrix(model_dir, calibration.text, calibration.samples,
                                      calibration.seqlen, work / f"imatrix-{key}.npz")
        return export_gguf(model_dir, self.artifact_path(staging), spec.weights, work, imatrix)


FORMAT = GgufFormat()
