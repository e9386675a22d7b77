"""Compress stage: methods that change weights before export, found by the recipe's `method` name.

A method lives in one module of this package that defines
  `Options`  a pydantic model of the step's arguments (unknown keys refused; a module
             serving several methods gives it a `method` field, filled from the recipe),
  `apply(source, dest, options, context)`  read the HF folder `source`, write an HF folder
             into the empty staging folder `dest` (safetensors, config, tokenizer), and
  optionally `identity(options, context)`  what of the options decides the output (it may
             raise UserError for options that cannot work with the variant's export).
METHODS maps recipe names to those modules; they are imported only when used, so reading
a recipe does not load torch's kernels for every method.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# recipe `method` → module under edgellm.compress that implements it
METHODS: dict[str, str] = {"gptq": "gptq", "smoothquant": "smoothquant", "magnitude": "prune",
                           "wanda": "prune", "sparsegpt": "prune", "depth": "depth",
                           "width": "width", "distill": "distill", "autoround": "autoround"}


@dataclass
class Context:
    """What a method may need besides its options: calibration text settings, the variant's
    export target (GPTQ rounds onto its grid), a console for progress, a work folder, the
    chain's original model (distillation's teacher), a folder that survives an interrupted
    step (its checkpoints; the method removes it when done) and, under a size budget, the
    type the export gives each tensor (GPTQ solves each linear onto its own grid)."""

    calibration: Any = None  # recipe CalibrationSpec
    export: Any = None  # recipe ExportSpec of the variant, None outside a recipe
    console: Any = None
    work: Path | None = None
    teacher: Path | None = None
    resume: Path | None = None
    # for an export that chooses a type per tensor (a GGUF size budget): computes its plan,
    # {"modules": {HF linear: ggml type}, "record": what the exporter writes from}
    tensor_types: Callable[[], dict] | None = None
    extra: dict = field(default_factory=dict)


def method_module(name: str):
    if name not in METHODS:
        known = ", ".join(sorted(METHODS))
        raise ValueError(f"unknown compress method '{name}' (known: {known})")
    return importlib.import_module(f"edgellm.compress.{METHODS[name]}")


def parse_options(step: dict) -> Any:
    """Validate one recipe step's arguments (everything but `method`) with its method's Options."""
    options = method_module(step["method"]).Options
    args = {k: v for k, v in step.items() if k != "method"}
    if "method" in options.model_fields:  # one module, several methods (prune.py)
        args["method"] = step["method"]
    return options.model_validate(args)


def apply_step(step: dict, source: Path, dest: Path, context: Context) -> None:
    module = method_module(step["method"])
    module.apply(Path(source), Path(dest), parse_options(step), context)


def step_identity(step: dict, context: Context) -> dict:
    """Everything that decides a step's output besides its input model: the method, its
    options with defaults filled in (or what the method says matters, via `identity`:
    GPTQ's bits and group size only select the export grid, which it names), and the
    calibration text settings. Steps with equal identities share one output."""
    module = method_module(step["method"])
    options = parse_options(step)
    if hasattr(module, "identity"):
        shown = module.identity(options, context)
    else:
        shown = options.model_dump()
    calibration = context.calibration.model_dump() if context.calibration else None
    return {"method": step["method"], "options": shown, "calibration": calibration}
