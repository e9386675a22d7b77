"""Compress stage: methods that change weights before export, found by the recipe's `method` name.

Each method is a config + one function `apply(model_dir, out_dir, step, calibration)`,
registered in METHODS. The foundation ships none; GPTQ, INT8, pruning and distillation
plug in here (one file each).
"""

from __future__ import annotations

METHODS: dict[str, object] = {}
