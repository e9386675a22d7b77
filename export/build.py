"""One entry point for the pipeline: write the artifact an ExportSpec asks for into a folder,
and say which path inside a variant folder the runtime opens."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgellm.artifacts import sha256_json
from edgellm.errors import UserError


def artifact_path(folder: Path, export) -> Path:
    if export.format == "torch":
        return folder
    if export.format == "gguf":
        return folder / "model.gguf"
    if export.format in ("onnx", "ort"):
        return folder / export.format  # a folder: model + genai_config.json + tokenizer
    if export.format == "mlx":
        return folder / "mlx"  # an mlx-lm folder
    raise UserError(f"export format '{export.format}' is not supported")


def export_artifact(model_dir: Path, staging: Path, export, name: str, work: Path,
                    calibration=None) -> Path:
    """Export the HF folder `model_dir` into `staging` as `export` says; `calibration`
    (the recipe's [calibration]) feeds the importance matrix when one is asked for."""
    target = artifact_path(staging, export)
    if export.format == "torch":
        for path in model_dir.iterdir():
            if path.is_file() and path.name not in ("manifest.json", "measurement.json"):
                shutil.copy2(path, staging / path.name)
        if export.weights == "int8":
            mark_int8_dynamic(staging / "config.json")
        return target
    if export.format == "gguf":
        from edgellm.export.gguf import export_gguf

        imatrix = None
        if export.imatrix:
            from edgellm.export.imatrix import compute_imatrix

            key = sha256_json(calibration.model_dump())[:12]
            imatrix = compute_imatrix(model_dir, calibration.text, calibration.samples,
                                      calibration.seqlen, work / f"imatrix-{key}.npz")
        return export_gguf(model_dir, target, export.weights, work, imatrix)
    if export.format == "mlx":
        from edgellm.export.mlx import export_mlx

        return export_mlx(model_dir, target, export.weights, work)
    if export.format in ("onnx", "ort"):
        from edgellm.export.onnx import convert_to_ort, export_onnx

        if export.format == "onnx":
            return export_onnx(model_dir, target, export, work)
        onnx_dir = export_onnx(model_dir, work / f"onnx-{name}", export, work)
        try:
            return convert_to_ort(onnx_dir, target, work)
        finally:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    raise UserError(f"export format '{export.format}' is not supported")


def mark_int8_dynamic(config_path: Path) -> None:
    """Tell the torch runtime to quantize this folder with torchao dynamic INT8 on load (the
    weights stay float on disk: torchao's int8 tensors have no portable file format)."""
    import json

    from edgellm.models import RUNTIME_QUANT_KEY

    config = json.loads(config_path.read_text())
    config[RUNTIME_QUANT_KEY] = "int8-dynamic"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
