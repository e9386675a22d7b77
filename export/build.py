"""One entry point for the pipeline: write the artifact an ExportSpec asks for into a folder,
and say which path inside a variant folder the runtime opens."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgellm.errors import UserError


def artifact_path(folder: Path, export) -> Path:
    if export.format == "torch":
        return folder
    if export.format == "gguf":
        return folder / "model.gguf"
    raise UserError(f"export format '{export.format}' is not supported")


def export_artifact(model_dir: Path, staging: Path, export, name: str, work: Path) -> Path:
    """Export the HF folder `model_dir` into `staging` as `export` says."""
    target = artifact_path(staging, export)
    if export.format == "torch":
        for path in model_dir.iterdir():
            if path.is_file() and path.name != "manifest.json":
                shutil.copy2(path, staging / path.name)
        return target
    if export.format == "gguf":
        from edgellm.export.gguf import export_gguf

        return export_gguf(model_dir, target, export.weights, work)
    raise UserError(f"export format '{export.format}' is not supported")
