"""MLX: an mlx-lm folder for Apple silicon, written by mlx-lm's converter (export/mlx.py)."""

from __future__ import annotations

from pathlib import Path

from edgellm.export.formats import Format
from edgellm.export.mlx import MLX_NEED, MLX_WEIGHTS


class MlxFormat(Format):
    name = "mlx"
    summary = "Apple silicon"
    weights = MLX_WEIGHTS
    lossless = "f16"
    runtimes = ("mlx",)
    build_tools = ("transformers", "mlx", "mlx-lm")
    family_need = MLX_NEED
    artifact = "mlx"  # an mlx-lm folder

    def opens_source(self, source) -> Path | None:
        """An mlx-lm folder: edgellm's MLX export, or any with MLX group quantization."""
        import json

        config_path = Path(source.path) / "config.json"
        if source.kind == "gguf" or not config_path.is_file():
            return None
        config = json.loads(config_path.read_text())
        is_mlx = (config.get("edgellm_export") or {}).get("format") == "mlx" or "quantization" in config
        return Path(source.path) if is_mlx else None

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        from edgellm.export.mlx import export_mlx

        return export_mlx(model_dir, self.artifact_path(staging), spec.weights, work)


FORMAT = MlxFormat()
