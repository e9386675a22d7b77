"""AutoRound (Cheng et al. 2023, Intel's `auto-round` library) onto the export's grid.

AutoRound tunes, one decoder block at a time, each weight's rounding (an offset in
[-0.5, 0.5] before rounding) and each group's range (factors on its min and max) by signed
gradient descent on the block's output error over the calibration text. GPTQ solves a
quadratic proxy of that error one column at a time instead. This step runs the library on
the grid the export will be written in (GPTQ's: `compress/gptq.grid_of`, or the size
budget's plan, a grid per linear), reads every linear's integers back, checks they lie
on that grid and compute AutoRound's weights, and writes the same standard GPTQ
checkpoint GPTQ writes, so the GGUF, ONNX and MLX exporters store the integers as they are.

Grids it does not tune onto are refused as a single type; inside a size budget their
matrices stay float in the checkpoint and the exporter rounds them. They are Q8_0
(-127..127; AutoRound's symmetric 8 bits reach -128) and every 8-bit grid, whose
integers do not read back exactly from the bfloat16 weights AutoRound leaves on CPU
(READ_BACK_BITS). AutoRound leaves the logits' matrix in float; under a size budget it is
solved as GPTQ solves it (`gptq.solve_head`, on the tuned model's final-norm inputs).
The library is an optional dependency (`pip install 'edgellm[autoround]'`).
"""

from __future__ import annotations

import importlib.metadata
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from edgellm.compress import gptq
from edgellm.compress.hessians import linear_layers
from edgellm.errors import UserError
from edgellm.grids import Grid, dequantize

PACKAGE = "auto-round"
# AutoRound tunes in bfloat16 on CPU (twice float32's speed here) and leaves bfloat16
# weights: 8 significant bits, so an integer k steps from the zero point reads back
# exactly while k·2^-8 < 1/2, i.e. on grids of up to 7 bits (8-bit grids: GPTQ)
READ_BACK_BITS = 7
# in each step's cache key; 2: blocks of several kinds (Gemma 3) tuned on their own inputs
REVISION = 2


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bits: Literal[4, 5, 8] | None = None  # in a recipe: taken from the export, as GPTQ's
    group_size: int | None = Field(None, gt=0)
    iters: int = Field(200, ge=1)  # tuning steps per block (the library's default)
    lr: float | None = Field(None, gt=0)  # the library's default: 1 / iters
    batch_size: int = Field(8, ge=1)  # calibration windows per tuning step
    samples: int | None = Field(None, gt=0)  # calibration windows; default [calibration].samples


def library_version() -> str:
    """The installed auto-round's version; refused (before any work) when it is missing."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError("method 'autoround' needs the auto-round package: "
                        "pip install 'edgellm[autoround]'") from None


def check_budget_options(options: Options, context) -> None:
    if gptq.budget_of(context) is not None and (options.bits or options.group_size):
        raise UserError("AutoRound under a size budget takes each tensor's grid from the "
                        "budget: leave bits and group_size out")


def single_grid(options: Options, context) -> Grid:
    """The export's grid (no budget), refused where AutoRound cannot compute it exactly."""
    grid = gptq.grid_of(gptq.Options(bits=options.bits, group_size=options.group_size), context,
                        "AutoRound")
    if not tunes(grid):
        raise UserError(f"AutoRound does not tune onto {grid.label} (its 4-bit to 7-bit "
                        "grids: GGUF q4_0/q5_0, ONNX int4, MLX q4): use GPTQ for it")
    return grid


def identity(options: Options, context) -> dict:
    """The tuning settings, the grid (or the budget) and the library's version."""
    chosen = {**options.model_dump(exclude={"bits", "group_size"}),
              "library": f"{PACKAGE} {library_version()}", "revision": REVISION}
    check_budget_options(options, context)
    if gptq.budget_of(context) is not None:
        return {**chosen, **gptq.budget_identity(context)}
    return {**chosen, "grid": single_grid(options, context).label}


def decoder_grids(model, options: Options, context) -> tuple[dict[str, Grid | None], dict | None]:
    """({decoder linear: its grid, None where it stays float}, the budget's plan or None)."""
    names = [f"model.layers.{i}.{name}" for i, layer in enumerate(model.model.layers)
             for name in linear_layers(layer)]
    if gptq.budget_of(context) is None:
        grid = single_grid(options, context)
        chosen, plan = dict.fromkeys(names, grid), None
    else:
        grids, plan = gptq.module_grids(gptq.Options(), context)
        chosen = {n: grids[n] if grids.get(n) is not None and tunes(grids[n]) else None
                  for n in names}
        plan = {**plan, "grids": grids}
    for name, grid in chosen.items():
        gptq.check_group_divides(name, model.get_submodule(name), grid, "AutoRound")
    return chosen, plan


def tunes(grid: Grid) -> bool:
    """Whether this step tunes onto `grid`: AutoRound computes it exactly and its integers
    read back from bfloat16."""
    return grid.autoround and grid.bits <= READ_BACK_BITS


def layer_config(grids: dict[str, Grid | None]) -> dict[str, dict]:
    """AutoRound's per-layer settings for these grids (16 bits: left in float)."""
    return {name: {"bits": 16} if grid is None else
            {"bits": grid.bits, "group_size": grid.group, "sym": grid.symmetric}
            for name, grid in grids.items()}


def apply(source: Path, dest: Path, options: Options, context) -> None:
    from rich.progress import Progress

    from edgellm.compress.calibration import calibration_ids

    library_version()
    check_budget_options(options, context)
    cal = context.calibration
    ids = calibration_ids(source, cal.text, options.samples or cal.samples, cal.seqlen)
    model = load_float(source)
    grids, plan = decoder_grids(model, options, context)
    label = next(iter(grids.values())).label if plan is None else "a type per tensor"
    with Progress(console=context.console, transient=True) as progress:
        progress.console.print(f"autoround: {label} on {len(ids)}×{ids.shape[1]} calibration "
                               f"tokens, {options.iters} steps a block")
        with block_progress(model.model.layers, progress):
            tune(model, source, ids, grids, options)
    write_checkpoint(model, source, dest, ids, grids, plan, options)


@contextmanager
def block_progress(blocks, progress):
    """Show which decoder block the library is tuning in edgellm's rich progress (the CLI
    turns tqdm bars off, the library's among them). It tunes the blocks in order, so a
    block's first call is its turn."""
    task = progress.add_task("autoround", total=len(blocks))

    def turn(index: int):
        return lambda _module, _args: progress.update(
            task, completed=index, description=f"autoround block {index + 1}/{len(blocks)}")

    hooks = [block.register_forward_pre_hook(turn(i)) for i, block in enumerate(blocks)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        progress.update(task, completed=len(blocks))


def load_float(source: Path):
    from transformers import AutoModelForCausalLM

    from edgellm.models import quiet_transformers

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                local_files_only=True).eval()


def tune(model, source: Path, ids: torch.Tensor, grids: dict[str, Grid | None],
         options: Options) -> None:
    """AutoRound over the decoder's linears in place: their weights become the tuned,
    quantized values, with `scale`/`zp` attributes beside them (the library's)."""
    import os

    os.environ.setdefault("AR_LOG_LEVEL", "WARNING")
    from auto_round import AutoRound, SignRoundConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    rounder = AutoRound(
        model, tokenizer, layer_config=layer_config(grids), dataset=[w[None] for w in ids],
        alg_configs=SignRoundConfig(iters=options.iters, lr=options.lr),
        nsamples=len(ids), seqlen=ids.shape[1], batch_size=min(options.batch_size, len(ids)),
        device_map="cpu", enable_torch_compile=False)  # bfloat16 on CPU (amp): twice as fast
    if layer_kinds(model.config) > 1:
        # the library replays block 0's rope and mask to every block unless told its blocks
        # differ (it says so itself only for Gemma 4): Gemma 3's global layers would be
        # tuned on the sliding layers' rope, and the chain of targets after them drifts
        rounder.has_variable_block_shape = True
    rounder.quantize()


def layer_kinds(config) -> int:
    """How many kinds of decoder layer (sliding/full attention) the model has."""
    return len(set(getattr(config, "layer_types", None) or ())) or 1


def integers(module: torch.nn.Module, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) on `grid` of a linear AutoRound quantized, read back from the
    weight it left (bfloat16 on CPU: |q - zero|·scale within half a step of the integer
    for grids of up to READ_BACK_BITS) and checked to compute that weight."""
    weight = module.weight.detach().float()
    rows, cols = weight.shape
    blocks = cols // grid.group
    scale = module.scale.detach().float().reshape(rows, blocks)
    zp = module.zp
    zero = (zp.detach().float().reshape(rows, blocks) if torch.is_tensor(zp) and zp.numel() > 1
            else torch.full((rows, blocks), float(zp)))
    flat = weight.reshape(rows * blocks, grid.group)
    q = grid.quantize(flat, scale.reshape(-1), zero.reshape(-1)).reshape(rows, cols)
    values = dequantize(grid, q, scale, zero)
    if not torch.allclose(values, weight, rtol=2 ** -7, atol=1e-6) or \
            scale.to(torch.float16).float().ne(scale).any():
        raise RuntimeError(f"AutoRound's weights are not on {grid.label}")
    return q, scale, zero


def write_checkpoint(model, source: Path, dest: Path, ids: torch.Tensor,
                     grids: dict[str, Grid | None], plan: dict | None, options: Options) -> None:
    """The tuned model as a GPTQ checkpoint folder in `dest` (one shard); under a size
    budget the logits' matrix solved by GPTQ onto its planned grid."""
    from edgellm.compress.layerwise import ShardWriter, TensorStore, copy_side_files

    store = TensorStore(source)
    tensors = {name: store.get(name) for name in store.names()}
    for name, grid in grids.items():
        if grid is not None:
            del tensors[f"{name}.weight"]
            parts = gptq.checkpoint_parts(grid, *integers(model.get_submodule(name), grid))
            tensors.update({f"{name}.{key}": value for key, value in parts.items()})
    if plan is not None:
        outside = {k: v for k, v in tensors.items() if not k.startswith("model.layers.")}
        tensors.update(gptq.solve_head(model, final_norm_inputs(model, ids), outside,
                                       plan["grids"], gptq.Options()))
    writer = ShardWriter(dest, 1)
    writer.write({k: v for k, v in tensors.items() if v is not None})
    writer.close()
    copy_side_files(source, dest)
    settings = {"autoround": {"iters": options.iters, "lr": options.lr,
                              "batch_size": options.batch_size, "library": library_version()}}
    if plan is None:
        gptq.write_quant_config(dest, next(iter(grids.values())), settings)
    else:
        gptq.write_mixed_config(dest, {**plan["grids"], **grids}, plan, settings)


@torch.no_grad()
def final_norm_inputs(model, ids: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """The last decoder layer's outputs [samples, seqlen, width] over the calibration ids."""
    seen = []
    hook = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        for start in range(0, len(ids), batch):
            model.model(input_ids=ids[start:start + batch], use_cache=False)
    finally:
        hook.remove()
    return torch.cat(seen)
