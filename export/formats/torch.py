"""torch: an HF folder run by transformers. `f32` is the folder itself; `int8` stores every
linear and the token embedding as int8 codes with one float32 scale per row, which the torch
runtime computes with as stored (edgellm/torch_int8.py: layout, kernels, measured speed),
with each linear's largest input per channel on the calibration text, from which decode
steps take the outlier channels they multiply in float."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgellm.export.formats import Format

NOT_COPIED = ("manifest.json", "measurement.json")
INPUT_WINDOWS = 8  # calibration windows the int8 export measures activations on


def is_weight_file(name: str) -> bool:
    """What the int8 export writes anew: the weights (sharded or not) and config.json."""
    return name == "config.json" or name.endswith((".safetensors", ".safetensors.index.json"))


class TorchFormat(Format):
    name = "torch"
    summary = "an HF folder run by transformers"
    weights = ("f32", "int8")
    lossless = None  # `edgellm export` writes deployable formats only
    runtimes = ("torch",)
    build_tools = ("torch", "transformers", "safetensors")
    memory_factor = 2.5
    own_rope = False  # transformers runs the model's own rope

    def bits_per_weight(self, weights: str) -> float:
        return 8.0 if weights == "int8" else 32.0  # int8: per-row scales add 32 bits a row

    def reads_calibration(self, spec) -> bool:
        return spec.weights == "int8" or super().reads_calibration(spec)

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        int8 = spec.weights == "int8"
        for path in model_dir.iterdir():
            if path.is_file() and path.name not in NOT_COPIED and not (int8 and is_weight_file(path.name)):
                shutil.copy2(path, staging / path.name)
        if int8:
            from edgellm.models import load_folder_model
            from edgellm.torch_int8 import write_int8_folder

            write_int8_folder(load_folder_model(model_dir), staging,
                              input_windows(model_dir, calibration))
        return self.artifact_path(staging)


FORMAT = TorchFormat()


def input_windows(model_dir: Path, calibration) -> list:
    """The calibration windows the int8 export measures each linear's inputs on (none
    without calibration text: decode steps then choose outliers per token)."""
    if calibration is None:
        return []
    from edgellm.data import calibration_windows

    return calibration_windows(model_dir, calibration.text, INPUT_WINDOWS, calibration.seqlen)
