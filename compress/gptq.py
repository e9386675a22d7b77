"""GPTQ (Frantar et al. 2022) on CPU, one decoder layer at a time, onto an export grid.

Each decoder layer runs on the calibration activations that the already-quantized layers
before it produce; hooks accumulate the Hessian of every linear layer's inputs (layers fed
the same input share one), the shared solver rounds each weight matrix onto the grid of
the format it will be written in, and the layer's outputs for the next layer are
recomputed with the quantized weights. Under a size budget, the logits' matrix (lm_head,
or the embedding tied to it) is solved last, on the final norm's outputs, onto the type the
budget gave it. The result is a standard GPTQ checkpoint folder (edgellm/gptq_checkpoint.py)
whose integers the GGUF, ONNX and MLX exporters store as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from edgellm.compress.hessians import (
    collect_hessians,
    linear_layers,
    sequential_groups,
    sharing_groups,
)
from edgellm.compress.solver import gptq_quantize
from edgellm.errors import UserError
from edgellm.gptq_checkpoint import (
    PackedLinear,
    dynamic_overrides,
    to_checkpoint,
    write_plan_imatrix,
)
from edgellm.grids import (
    GRIDS,
    SHRINKS,
    Grid,
    dequantize,
    grid_for_export,
    grid_named,
    standalone_grid,
)


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 5, 8] | None = None  # in a recipe: taken from the export (q4_0, int4, ...)
    group_size: int | None = Field(None, gt=0)
    grid: Literal["q4_0", "q5_0", "q8_0", "nbits"] | None = None  # outside a recipe; nbits by default
    symmetric: bool = True  # nbits grids outside a recipe (int4 sym g32 is also Q4_0's grid)
    act_order: bool = True
    clip_search: bool = True  # choose each block's scale by weighted rounding error
    # re-solve each row's block scales against the full Hessian (solver.refit_scales); by
    # default on 4-bit grids only: on SmolLM2 it lowered KL on every grid, but perplexity
    # only on 4-bit ones (Q5_0: KL −9%, Δppl +1.89% → +2.30%; README, GPTQ)
    refit: bool | None = None
    # activation-aware scales folded into each layer before it is solved (compress/awq.py);
    # by default on in the native solver: on SmolLM2 it lowered KL and perplexity on Q4_0
    # and Q5_0, on wikitext and on Hamlet (README, GPTQ)
    awq: bool | None = None
    damp: float = Field(0.01, gt=0, lt=1)
    block: int = Field(128, ge=32)
    samples: int | None = Field(None, gt=0)  # calibration windows; default [calibration].samples
    # each sharing group's Hessian measured after the groups before it were solved (o_proj
    # on what the solved q/k/v attend, ...), as GPTQ's reference code does. Off by default:
    # on SmolLM2 it helped the MLX 4.5 bpw budget (+12.29% → +11.83%) and not the GGUF
    # ≤ 91.7 MB one (+2.97% → +3.62%, KL 0.044 → 0.046; README, GPTQ)
    true_sequential: bool = False
    backend: Literal["native", "gptqmodel"] = "native"  # gptqmodel: CUDA only (gptqmodel_backend.py)


def grid_of(options: Options, context, method: str = "GPTQ") -> Grid:
    export = getattr(context, "export", None)
    if export is not None and export.format != "torch":
        grid = grid_for_export(export, options.bits, options.group_size, method)
    else:
        grid = standalone_grid(options.grid, options.bits or 4, options.group_size or 32,
                               options.symmetric)
    if not grid.gptq:
        offered = ", ".join(name for name, cls in GRIDS.items() if cls.gptq)
        raise UserError(f"GPTQ onto {grid.label} is not offered: its float minimum does not fit "
                        f"a GPTQ checkpoint; use one of {offered}")
    return grid


def budget_of(context):
    """The export's size budget when it chooses a type per tensor (a GGUF max_size_mb)."""
    export = getattr(context, "export", None)
    return getattr(export, "max_size_mb", None) if export is not None else None


def budget_identity(context) -> dict:
    """What names a step solved under a budget's plan: the plan follows from the input, the
    budget, its candidates and the calibration. GGUF plans are priced with the logits'
    matrix in the importance matrix since 2026-12-05: steps cached before are not reused."""
    weighed = {"imatrix_logits": True} if context.export.format == "gguf" else {}
    return {"grid": "per-tensor", "max_size_mb": budget_of(context),
            "candidates": list(context.export.candidates or ()), "head": "solved", **weighed}


def check_budget_options(options: Options) -> None:
    if options.bits is not None or options.group_size is not None or options.backend != "native":
        raise UserError("GPTQ under a size budget takes each tensor's grid from the budget: "
                        "leave bits, group_size and backend out")


def module_grids(options: Options, context) -> tuple[dict[str, Grid | None], dict]:
    """Under a size budget: {HF linear: the grid of the type the budget gave its tensor, or
    None for a type GPTQ cannot solve onto (k-quants: left in float, the exporter's quantizer
    rounds it)} and the budget's plan, which the checkpoint carries to the exporter."""
    check_budget_options(options)
    plan = context.tensor_types()
    grids = {}
    for module, kind in plan["modules"].items():
        grid = grid_named(kind)
        grids[module] = grid if grid is not None and grid.gptq else None
    return grids, plan


def identity(options: Options, context) -> dict:
    """bits/group_size/grid/symmetric only choose the grid: name the grid instead."""
    chosen = options.model_dump(exclude={"bits", "group_size", "grid", "symmetric"})
    if options.awq and options.backend != "native":
        raise UserError("awq = true runs in the native GPTQ solver: leave backend out")
    if awq_for(options):
        chosen["awq"] = True
    else:  # keeps the keys of steps cached before the option existed
        del chosen["awq"]
    if budget_of(context) is not None:  # the plan follows from the input, budget and calibration
        check_budget_options(options)
        del chosen["backend"]
        return {**chosen, **budget_identity(context)}
    grid = grid_of(options, context)
    if options.backend == "native":  # keeps the keys of steps cached before backends existed
        del chosen["backend"]
    else:  # refused before any work starts, as a recipe's other mistakes are
        from edgellm.compress import gptqmodel_backend

        gptqmodel_backend.quantize_config_kwargs(grid, options)
        gptqmodel_backend.check_available()
    return {**chosen, "grid": grid.label}


def apply(source: Path, dest: Path, options: Options, context) -> None:
    from rich.progress import Progress

    from edgellm.compress.calibration import calibration_ids
    from edgellm.compress.layerwise import stream_layers

    if budget_of(context) is not None:
        grids, plan = module_grids(options, context)
        grid_for, label = grids.get, "a type per tensor"
    else:
        grid, plan = grid_of(options, context), None
        grid_for, label = (lambda _module: grid), grid.label
    cal = context.calibration
    ids = calibration_ids(source, cal.text, options.samples or cal.samples, cal.seqlen)
    if options.backend == "gptqmodel":
        from edgellm.compress import gptqmodel_backend

        gptqmodel_backend.quantize(source, dest, grid, options, ids, context.console)
        return

    config = json.loads((Path(source) / "config.json").read_text())
    alphas: list[float] = []

    def process(index: int, layer: torch.nn.Module, inputs) -> dict[str, torch.Tensor]:
        return quantize_layer(layer, inputs, grid_for, options, f"model.layers.{index}",
                              config, alphas)

    def head(model, hidden: torch.Tensor, tensors) -> dict[str, torch.Tensor | None]:
        return solve_head(model, hidden, tensors, grids, options)

    with Progress(console=context.console, transient=True) as progress:
        progress.console.print(f"gptq: {label} on {len(ids)}×{ids.shape[1]} calibration tokens")
        stream_layers(source, dest, ids, process, progress, head=head if plan else None)
        if awq_for(options):
            moved = [a for a in alphas if a]
            progress.console.print(f"gptq: awq scaled {len(moved)} of {len(alphas)} places"
                                   + (f", mean α {sum(moved) / len(moved):.2f}" if moved else ""))
    if plan is None:
        write_quant_config(dest, grid, solver_settings(options))
    else:
        write_mixed_config(dest, grids, plan, solver_settings(options))


def quantize_layer(layer: torch.nn.Module, inputs, grid_for, options: Options, prefix: str,
                   config: dict | None = None, alphas: list | None = None) -> dict[str, torch.Tensor]:
    """GPTQ every linear of one decoder layer in place onto `grid_for(module name)` (None:
    left in float); return the layer's tensors to store (checkpoint parts for the solved
    linears, the rest as they are). With AWQ (`awq_for`), the layer's activation-aware scales
    (`config`: the model's config.json) are folded in first; their α go to `alphas`. With
    `true_sequential`, each group of linears sharing an input is solved on the Hessian
    measured after the groups before it were solved."""
    linears = linear_layers(layer)
    grids = {name: grid_for(f"{prefix}.{name}") for name in linears}
    for name, module in linears.items():
        check_group_divides(f"{prefix}.{name}", module, grids[name])
    one_pass = awq_for(options) or not options.true_sequential  # AWQ searches on all of them
    hessians = collect_hessians(layer, inputs) if one_pass else {}
    if awq_for(options):
        from edgellm.compress.awq import scale_layer

        chosen = scale_layer(layer, config, linears, grids, hessians)
        if alphas is not None:
            alphas.extend(chosen)
    stored, solved = {}, set()
    if options.true_sequential:  # each group measured once the groups before it are solved
        sequence = sequential_groups(layer, inputs)
    else:
        sequence = ((names, hessians[names[0]]) for names in sharing_groups(hessians))
    for sharing, hessian in sequence:
        by_grid: dict[Grid, list[str]] = {}
        for name in sharing:
            if grids[name] is not None:
                by_grid.setdefault(grids[name], []).append(name)
        for grid, names in by_grid.items():
            stored.update(solve_group(linears, names, hessian.matrix(), grid, options))
            solved.update(names)
    for name, tensor in layer.state_dict().items():
        module, _, part = name.rpartition(".")
        if module not in solved or part == "bias":  # biases stay float beside the integers
            stored[name] = tensor
    return stored


def check_group_divides(name: str, linear: torch.nn.Linear, grid: Grid | None,
                        method: str = "GPTQ") -> None:
    """Refuse a grid whose groups do not tile the linear's inputs (None: left in float)."""
    if grid is not None and linear.in_features % grid.group:
        raise UserError(f"{method} group size {grid.group} does not divide {name}'s "
                        f"{linear.in_features} inputs: choose a group size that does")


def solve_group(linears: dict, names: list[str], hessian: torch.Tensor, grid: Grid,
                options: Options) -> dict[str, torch.Tensor]:
    """GPTQ the linears `names` (one input, one Hessian) together onto `grid`; their weights
    become the solved values, their checkpoint parts are returned."""
    weights = torch.cat([linears[n].weight.data for n in names])
    q, scale, zero = gptq_quantize(weights, hessian, grid, options.act_order, options.damp,
                                   options.block, SHRINKS if options.clip_search else (1.0,),
                                   refit_for(options, grid))
    stored, start = {}, 0
    for name in names:
        rows = linears[name].out_features
        part = slice(start, start + rows)
        start += rows
        linears[name].weight.data = dequantize(grid, q[part], scale[part], zero[part])
        for key, tensor in checkpoint_parts(grid, q[part], scale[part], zero[part]).items():
            stored[f"{name}.{key}"] = tensor
    return stored


def checkpoint_parts(grid: Grid, q: torch.Tensor, scale: torch.Tensor,
                     zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """One linear's GPTQ checkpoint tensors (qweight, qzeros, scales, g_idx) from its
    integers on `grid` (q [out, in], scale and zero [out, groups])."""
    packed = PackedLinear(grid.stored(q), scale, grid.stored(zero), grid.storage_bits, grid.group)
    return to_checkpoint(packed)


def head_module(config) -> str:
    """The module whose matrix computes the logits: lm_head, or the embedding tied to it."""
    return "model.embed_tokens" if getattr(config, "tie_word_embeddings", False) else "lm_head"


@torch.no_grad()
def solve_head(model, hidden: torch.Tensor, tensors: dict[str, torch.Tensor],
               grids: dict[str, Grid | None], options: Options) -> dict[str, torch.Tensor | None]:
    """GPTQ the logits' matrix onto the grid a size budget gave it, as a linear on the
    final norm's outputs (`tensors`: the source's tensors outside the decoder layers, read
    once by stream_layers). A tied embedding keeps its float weight (the solved values,
    which the lookup reads) beside the integers; an untied lm_head is stored as integers only."""
    from edgellm.compress.solver import Hessian

    name = head_module(model.config)
    grid = grids.get(name)
    if grid is None or f"{name}.weight" not in tensors:
        return {}
    weight = tensors[f"{name}.weight"].float()
    if weight.shape[1] % grid.group or weight.shape[0] % (32 // grid.storage_bits):
        return {}  # no checkpoint layout for it: left to the exporter's rounding
    norm = model.model.norm
    norm.load_state_dict({k: tensors[f"model.norm.{k}"] for k in norm.state_dict()},
                         strict=True, assign=True)
    hessian = Hessian(hidden.shape[-1])
    for chunk in hidden.split(8):
        hessian.add(norm(chunk))
    norm.to("meta")
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    stored = solve_group({name: linear}, [name], hessian.matrix(), grid, options)
    tied = name == "model.embed_tokens"
    stored[f"{name}.weight"] = linear.weight.data if tied else None
    return stored


def awq_for(options: Options) -> bool:
    """Whether activation-aware scales are folded in: as the options say, else in the
    native solver (GPTQModel's backend has its own pipeline)."""
    return options.backend == "native" if options.awq is None else options.awq


def refit_for(options: Options, grid: Grid) -> bool:
    """Whether GPTQ refits the scales onto `grid`: as the options say, else on 4-bit grids."""
    return grid.bits == 4 if options.refit is None else options.refit


def solver_settings(options: Options) -> dict:
    """What a checkpoint's quantization_config records of how GPTQ solved it."""
    return {"static_groups": options.act_order, "true_sequential": options.true_sequential,
            "damp_percent": options.damp}


def write_quant_config(dest: Path, grid: Grid, settings: dict) -> None:
    """Mark the folder a GPTQ checkpoint (v1 format) as GPTQModel and transformers expect;
    `edgellm_grid` records which export grid the integers were solved on, `settings` how
    (`solver_settings`, or another method's)."""
    path = Path(dest) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": grid.storage_bits,
        "group_size": grid.group, "sym": grid.symmetric and grid.bits == grid.storage_bits,
        "desc_act": False, **settings, "edgellm_grid": grid.label,
    }
    path.write_text(json.dumps(config, indent=2) + "\n")


def write_mixed_config(dest: Path, grids: dict[str, Grid | None], plan: dict,
                       settings: dict) -> None:
    """A checkpoint whose linears sit on several grids: the most common grid's settings as
    the checkpoint's, GPTQModel `dynamic` overrides for the others ("-:" for linears left
    in float), each linear's grid (`edgellm_grids`) and the budget's plan, which the GGUF
    exporter writes as it is (`edgellm_tensor_types`), with the importance matrix the plan
    was priced with where it has one (GGUF: llama.cpp rounds the tensors left to it with it)."""
    from collections import Counter

    def grid_settings(grid: Grid) -> tuple[int, int, bool]:
        return grid.storage_bits, grid.group, grid.symmetric and grid.bits == grid.storage_bits

    used = Counter(grid_settings(g) for g in grids.values() if g is not None)
    if not used:
        raise UserError("the size budget gave no linear a type GPTQ solves onto (q4_0, q5_0, "
                        "q8_0): add one of them to the candidates, or leave GPTQ out")
    base = used.most_common(1)[0][0]
    path = Path(dest) / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": base[0],
        "group_size": base[1], "sym": base[2], "desc_act": False, **settings,
        "edgellm_grid": "mixed",
        "dynamic": dynamic_overrides({m: g and grid_settings(g) for m, g in grids.items()}, base),
        "edgellm_grids": {m: g and g.label for m, g in sorted(grids.items())},
        "edgellm_tensor_types": plan["record"],
    }
    if plan.get("imatrix") is not None:
        write_plan_imatrix(dest, plan["imatrix"])
    path.write_text(json.dumps(config, indent=2) + "\n")
