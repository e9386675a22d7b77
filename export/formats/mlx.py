"""MLX: an mlx-lm folder for Apple silicon, written by mlx-lm's converter (export/mlx.py)."""

from __future__ import annotations

from pathlib import Path

from edgellm.export.budget_spec import (
    MIXED,
    budget_problem,
    complete_budget,
)
from edgellm.export.formats import Format
from edgellm.export.mlx import MLX_NEED, MLX_WEIGHTS


class MlxFormat(Format):
    name = "mlx"
    summary = "Apple silicon"
    weights = (*MLX_WEIGHTS, MIXED)
    lossless = "f16"
    auto_candidates = ("f16", "q8", "q4")
    budget_artifact = "MLX folder"  # what a size budget's floor names
    runtimes = ("mlx",)
    build_tools = ("transformers", "mlx", "mlx-lm")
    options = ("max_size_mb", "target_bpw", "candidates")  # bits and group size per matrix
    family_need = MLX_NEED
    artifact = "mlx"  # an mlx-lm folder

    def complete(self, spec) -> None:
        from edgellm.export.mlx_budget import BUDGET_CANDIDATES

        complete_budget(spec, BUDGET_CANDIDATES)

    def check_spec(self, spec) -> str | None:
        from edgellm.export.mlx_budget import KNOWN_CANDIDATES

        return budget_problem(spec, KNOWN_CANDIDATES, lambda c: self.candidate_bpw(c, spec))

    def candidate_bpw(self, candidates, spec) -> dict[str, float]:
        from edgellm.export.mlx_budget import candidate_bpw

        return candidate_bpw(candidates)

    def bits_per_weight(self, weights: str) -> float:
        return 8.5 if weights == MIXED else super().bits_per_weight(weights)  # at most q8-g64

    def describe(self, artifact: Path) -> dict:
        """Matrices and bytes per bits/group of a budget's folder, and the prediction."""
        import json

        from edgellm.export.mlx_budget import ALLOCATION_FILE, stored_types

        plan = artifact.parent / ALLOCATION_FILE
        if not plan.is_file():
            return {}
        record = json.loads(plan.read_text())
        return {"tensor_types": stored_types(artifact),
                "predicted_kl": record["predicted_kl"], "max_size_mb": record["max_size_mb"]}

    def opens_source(self, source) -> Path | None:
        """An mlx-lm folder: edgellm's MLX export, or any with MLX group quantization."""
        import json

        config_path = Path(source.path) / "config.json"
        if source.kind == "gguf" or not config_path.is_file():
            return None
        config = json.loads(config_path.read_text())
        is_mlx = (config.get("edgellm_export") or {}).get("format") == "mlx" or "quantization" in config
        return Path(source.path) if is_mlx else None

    def tensor_plan(self, model_dir: Path, spec, work: Path, calibration) -> dict | None:
        if spec.max_size_mb is None:
            return None
        from edgellm.export.mlx_budget import budget_plan, plan_modules

        record = budget_plan(model_dir, spec, work, calibration, gptq=True)
        return {"modules": plan_modules(record), "record": record}

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        if spec.max_size_mb is not None:
            from edgellm.export.mlx_budget import export_budget_mlx

            return export_budget_mlx(model_dir, self.artifact_path(staging), spec, work,
                                     calibration)
        from edgellm.export.mlx import export_mlx

        return export_mlx(model_dir, self.artifact_path(staging), spec.weights, work)


FORMAT = MlxFormat()
