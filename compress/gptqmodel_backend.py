"""The optional GPTQModel backend of the gptq step (`backend = "gptqmodel"`): CUDA only.

GPTQModel (ModelCloud; the maintained successor of auto-gptq) solves on a GPU much faster
than edgellm's CPU solver on large models, but only onto its own grids: 4 or 8 bits with
an integer zero point per group. Those are the MatMulNBits grids (`int4`/`int8` ONNX), and
with 4 bits, symmetric, groups of 32 also GGUF Q4_0's layout ((q − 8)·d), so its checkpoint
carries into those exports without a second rounding; q5_0/q8_0 have no GPTQModel grid and
are refused. edgellm passes the same calibration windows it would use itself, asks for the
v1 `gptq` checkpoint format with contiguous groups (`desc_act = False`), then reads the
result back with its own checkpoint reader so a layout it cannot export fails here, in
one line. The native solver stays the default and the one tested end to end.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import torch

from edgellm.errors import UserError
from edgellm.grids import Grid

NATIVE_HINT = "leave `backend` out to use edgellm's own solver, which runs on CPU"


def check_available() -> None:
    """GPTQModel installed and a CUDA device visible, or a one-line refusal."""
    if importlib.util.find_spec("gptqmodel") is None:
        raise UserError("gptq backend \"gptqmodel\" needs the gptqmodel package and a CUDA GPU "
                        f"(pip install gptqmodel); {NATIVE_HINT}")
    if not torch.cuda.is_available():
        raise UserError(f"gptq backend \"gptqmodel\" needs a CUDA GPU and torch sees none; {NATIVE_HINT}")


def quantize_config_kwargs(grid: Grid, options) -> dict:
    """GPTQModel QuantizeConfig arguments that solve onto `grid`."""
    if not grid.gptqmodel:
        raise UserError(f"gptq backend \"gptqmodel\" has no {grid.label} grid (it writes 4- or "
                        f"8-bit integers with a zero point per group); {NATIVE_HINT}")
    return {"bits": grid.bits, "group_size": grid.group, "sym": grid.symmetric,
            "desc_act": False, "static_groups": options.act_order,
            "damp_percent": options.damp, "true_sequential": options.true_sequential,
            "format": "gptq"}


def calibration_rows(ids: torch.Tensor) -> list[dict[str, list[int]]]:
    """The calibration windows as GPTQModel takes pre-tokenized samples."""
    return [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids]


def quantize(source: Path, dest: Path, grid: Grid, options, ids: torch.Tensor, console) -> None:
    """Run GPTQModel on `source` and leave a v1 GPTQ checkpoint for `grid` in `dest`."""
    check_available()
    from gptqmodel import GPTQModel, QuantizeConfig

    accepted = {field.name for field in dataclasses.fields(QuantizeConfig)}
    kwargs = {k: v for k, v in quantize_config_kwargs(grid, options).items() if k in accepted}
    console.print(f"gptq (GPTQModel on CUDA): {grid.label} on {len(ids)}×{ids.shape[1]} "
                  "calibration tokens")
    model = GPTQModel.load(str(source), QuantizeConfig(**kwargs))
    model.quantize(calibration_rows(ids), batch_size=1)
    model.save(str(dest))
    finish_checkpoint(source, dest, grid)


def finish_checkpoint(source: Path, dest: Path, grid: Grid) -> None:
    """Tokenizer files GPTQModel did not copy, `edgellm_grid` in the config, and a read-back
    through edgellm's own reader (it refuses what the exporters could not carry)."""
    from edgellm.gptq_checkpoint import dequantized_state, gptq_config
    from edgellm.model_folder import copy_side_files

    copy_side_files(source, dest, overwrite=False)
    config_path = dest / "config.json"
    config = json.loads(config_path.read_text())
    quant = gptq_config(config)
    if quant is None:
        raise UserError(f"GPTQModel wrote no GPTQ quantization_config into {config_path}")
    if quant.get("desc_act") and not quant.get("static_groups"):
        raise UserError(f"GPTQModel reordered the groups of {dest} (desc_act): the exporters "
                        "need contiguous groups")
    quant["edgellm_grid"] = grid.label
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    dequantized_state(dest)  # raises one line on anything edgellm cannot read
