"""ONNX: a decoder with KV cache plus genai_config.json for onnxruntime(-genai), written by
export/onnx.py (the onnxruntime-genai model builder)."""

from __future__ import annotations

from pathlib import Path

from edgellm.export.budget_spec import (
    MIXED,
    budget_problem,
    complete_budget,
    has_budget,
)
from edgellm.export.formats import Format
from edgellm.export.onnx import ONNX_NEED, ONNX_WEIGHTS

# MatMulNBits options (int4/int8 weight-only): ExportSpec fields only ONNX exports read
MATMUL_NBITS_OPTIONS = ("block_size", "accuracy_level", "symmetric", "lm_head_bits")
# a size budget: bits and block size per matrix (export/onnx_budget.py)
BUDGET_OPTIONS = ("max_size_mb", "target_bpw", "candidates")


class OnnxFormat(Format):
    name = "onnx"
    summary = "ONNX Runtime"
    weights = (*ONNX_WEIGHTS, MIXED)
    lossless = "f32"
    auto_candidates = ("f32", "f16", "int8", "int4")
    budget_artifact = "ONNX file"  # what a size budget's floor names
    runtimes = ("onnxruntime",)
    build_tools = ("torch", "transformers", "onnx", "onnx-ir", "onnxruntime-genai")
    options = (*MATMUL_NBITS_OPTIONS, *BUDGET_OPTIONS)
    family_need = ONNX_NEED
    artifact = "onnx"  # a folder: model + genai_config.json + tokenizer

    def complete(self, spec) -> None:
        from edgellm.export.onnx_budget import BUDGET_CANDIDATES

        complete_budget(spec, BUDGET_CANDIDATES)

    def check_spec(self, spec) -> str | None:
        from edgellm.export.onnx_budget import KNOWN_CANDIDATES

        problem = budget_problem(spec, KNOWN_CANDIDATES, lambda c: self.candidate_bpw(c, spec))
        if problem is None and has_budget(spec) and "lm_head_bits" in spec.model_fields_set:
            return "a size budget chooses the embedding/lm_head's bits too: leave lm_head_bits out"
        return problem

    def candidate_bpw(self, candidates, spec) -> dict[str, float]:
        from edgellm.export.onnx_budget import candidate_bpw

        return candidate_bpw(candidates, spec)

    def bits_per_weight(self, weights: str) -> float:
        return 9.25 if weights == MIXED else super().bits_per_weight(weights)  # at most int8

    def describe(self, artifact: Path) -> dict:
        """Matrices and bytes per chosen type, and the prediction, of a budget's model."""
        import json

        from edgellm.export.onnx_budget import ALLOCATION_FILE, stored_types

        plan = artifact.parent / ALLOCATION_FILE
        if not plan.is_file():
            return {}
        record = json.loads(plan.read_text())
        return {"tensor_types": stored_types(artifact / "model.onnx"),
                "predicted_kl": record["predicted_kl"], "max_size_mb": record["max_size_mb"]}

    def tensor_plan(self, model_dir: Path, spec, work: Path, calibration) -> dict | None:
        if spec.max_size_mb is None:
            return None
        from edgellm.export.onnx_budget import budget_plan, plan_modules

        record = budget_plan(model_dir, spec, work, calibration, gptq=True)
        return {"modules": plan_modules(record), "record": record}

    def opens_path(self, path: Path) -> Path | None:
        return path if onnx_kind(path) == self.name else None

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        if spec.max_size_mb is not None:
            from edgellm.export.onnx_budget import export_budget_onnx

            return export_budget_onnx(model_dir, self.artifact_path(staging), spec, work,
                                      calibration)
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
