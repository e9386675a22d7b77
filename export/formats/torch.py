"""torch: the HF folder itself, run by transformers; `int8` marks it for torchao's dynamic
INT8 when the runtime loads it (the weights stay float on disk: torchao's int8 tensors have
no portable file format)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgellm.export.formats import Format


class TorchFormat(Format):
    name = "torch"
    summary = "an HF folder run by transformers"
    weights = ("f32", "int8")
    lossless = None  # `edgellm export` writes deployable formats only
    runtimes = ("torch",)
    build_tools = ("torch", "transformers", "torchao")
    memory_factor = 2.5
    own_rope = False  # transformers runs the model's own rope

    def bits_per_weight(self, weights: str) -> float:
        return 32.0  # float on disk whatever the weights (int8 happens at load)

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        for path in model_dir.iterdir():
            if path.is_file() and path.name not in ("manifest.json", "measurement.json"):
                shutil.copy2(path, staging / path.name)
        if spec.weights == "int8":
            mark_int8_dynamic(staging / "config.json")
        return self.artifact_path(staging)


def mark_int8_dynamic(config_path: Path) -> None:
    """Tell the torch runtime to quantize this folder with torchao dynamic INT8 on load."""
    from edgellm.models import RUNTIME_QUANT_KEY

    config = json.loads(config_path.read_text())
    config[RUNTIME_QUANT_KEY] = "int8-dynamic"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


FORMAT = TorchFormat()
