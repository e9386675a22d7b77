"""Compress stage: methods that change weights before export, found by the recipe's `method` name.

A method lives in one module of this package that defines
  `Options`  a pydantic model of the step's arguments (unknown keys refused), and
  `apply(source, dest, options, context)`  read the HF folder `source`, write an HF folder
             into the empty staging folder `dest` (safetensors, config, tokenizer).
METHODS maps recipe names to those modules; they are imported only when used, so reading
a recipe does not load torch's kernels for every method.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# recipe `method` → module under edgellm.compress that implements it
METHODS: dict[str, str] = {"gptq": "gptq"}


@dataclass
class Context:
    """What a method may need besides its options: calibration text settings, the variant's
    export target (GPTQ rounds onto its grid), a console for progress, and a work folder."""

    calibration: Any = None  # recipe CalibrationSpec
    export: Any = None  # recipe ExportSpec of the variant, None outside a recipe
    console: Any = None
    work: Path | None = None
    extra: dict = field(default_factory=dict)


def method_module(name: str):
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown compress method '{name}' (known: {known})")
    return importlib.import_module(f"edgellm.compress.{METHODS[name]}")


def parse_options(step: dict) -> Any:
    """Validate one recipe step's arguments (everything but `method`) with its method's Options."""
    args = {k: v for k, v in step.items() if k != "method"}
    return method_module(step["method"]).Options.model_validate(args)


def apply_step(step: dict, source: Path, dest: Path, context: Context) -> None:
    module = method_module(step["method"])
    module.apply(Path(source), Path(dest), parse_options(step), context)


def key_inputs(step: dict, context: Context) -> dict:
    """What besides the input model and the step decides a step's output: the calibration
    text settings, plus what the method itself declares (GPTQ: the export grid)."""
    module = method_module(step["method"])
    inputs = {"calibration": context.calibration.model_dump() if context.calibration else None}
    if hasattr(module, "key_inputs"):
        inputs.update(module.key_inputs(parse_options(step), context))
    return inputs
