"""Unstructured and N:M pruning of the decoder's linear layers: magnitude, Wanda, SparseGPT.

  magnitude  zero the smallest |W| of each output row (no calibration text)
  wanda      (Sun et al. 2023) zero the smallest |W_ij|·‖X_j‖ of each output row, with
             ‖X_j‖ the norm of input channel j over the calibration tokens
  sparsegpt  (Frantar & Alistarh 2023) choose the mask block by block from W²/[H⁻¹]²_jj and
             spread each zeroed weight's error over the row's later columns through the
             shared OBS solver (compress/solver.py, the one GPTQ uses)

Wanda and SparseGPT run one decoder layer at a time, each layer fed by the already-pruned
layers before it. `pattern = "N:M"` keeps at most N non-zero weights in every M consecutive
inputs of a row (NVIDIA's convention: "2:4" keeps 2 of 4); otherwise each row loses
`sparsity` of its weights. The tied embedding / lm_head is never pruned: on SmolLM2 it is
a fifth of the weights, and pruning it costs far more quality than the decoder layers.
Written here because the maintained pruners (llm-compressor) pull a training framework and
round their own way; these few functions share edgellm's layer streaming and solver.
Zeros stored densely save no bytes and no time in llama.cpp or ONNX Runtime on CPU: the
report shows the measured sparsity beside unchanged size and speed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgellm.archs import attention_shape
from edgellm.compress.hessians import (
    collect_hessians,
    linear_layers,
    sequential_groups,
    sharing_groups,
)
from edgellm.compress.solver import inverse_factor, obs_sweep
from edgellm.errors import UserError


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["magnitude", "wanda", "sparsegpt"]
    sparsity: float | None = Field(None, gt=0, lt=1)  # fraction of weights zeroed per row
    pattern: str | None = None  # "N:M": at most N non-zero in every M consecutive inputs
    # sparsegpt: Hessian damping; 0.1 measured better than GPTQ's 0.01 on SmolLM2 (README)
    damp: float = Field(0.1, gt=0, lt=1)
    block: int = Field(128, ge=16)  # sparsegpt: columns per lazy block (mask chosen per block)
    sequential: bool = True  # measure each group's inputs after the earlier groups were pruned
    samples: int | None = Field(None, gt=0)  # calibration windows; default [calibration].samples

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            parts = pattern.split(":")
            if len(parts) != 2 or not all(p.isdigit() for p in parts) or \
                    not 0 < int(parts[0]) < int(parts[1]):
                raise ValueError(f"pattern '{pattern}' is not N:M with 0 < N < M, e.g. '2:4'")
        return pattern

    @model_validator(mode="after")
    def _one_sparsity(self):
        if self.pattern is None and self.sparsity is None:
            self.sparsity = 0.5
        elif self.pattern is not None:
            keep, group = self.nm
            implied = 1 - keep / group
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"sparsity {self.sparsity} contradicts pattern {self.pattern} "
                                 f"(which zeroes {implied:g}): give one of them")
            self.sparsity = implied
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N kept, M) of the pattern, or None."""
        if self.pattern is None:
            return None
        keep, group = self.pattern.split(":")
        return int(keep), int(group)


def apply(source: Path, dest: Path, options: Options, context) -> None:
    from rich.progress import Progress

    from edgellm.compress.calibration import calibration_ids
    from edgellm.compress.layerwise import stream_layers

    check_pattern_fits(source, options)
    prune_rows = ROW_PRUNERS[options.method]
    with Progress(console=context.console, transient=True) as progress:
        label = options.pattern or f"{options.sparsity:.0%}"
        if options.method == "magnitude":
            progress.console.print(f"magnitude: {label} of each decoder row")
            prune_without_calibration(source, dest, options, progress)
            return
        cal = context.calibration
        ids = calibration_ids(source, cal.text, options.samples or cal.samples, cal.seqlen)
        progress.console.print(f"{options.method}: {label} on {len(ids)}×{ids.shape[1]} "
                               "calibration tokens")

        def process(_index: int, layer: torch.nn.Module, inputs) -> None:
            linears = linear_layers(layer)
            groups = layer_groups(layer, inputs, options.sequential,
                                  diagonal=options.method == "wanda")
            for names, hessian in groups:
                weights = torch.cat([linears[n].weight.data for n in names])
                pruned = prune_rows(weights, hessian.matrix(), options)
                parts = pruned.split([linears[n].out_features for n in names])
                for name, part in zip(names, parts, strict=True):
                    linears[name].weight.data = part.to(linears[name].weight.dtype).contiguous()

        stream_layers(source, dest, ids, process, progress)


def layer_groups(layer: torch.nn.Module, inputs, sequential: bool, diagonal: bool = False):
    """(names, Hessian) per group of linears sharing an input: measured one group at a time
    after the earlier groups were pruned, or all at once on the unpruned layer (only the
    diagonal when `diagonal`)."""
    if sequential:
        yield from sequential_groups(layer, inputs, diagonal)
        return
    hessians = collect_hessians(layer, inputs, diagonal=diagonal)
    for names in sharing_groups(hessians):
        yield names, hessians[names[0]]


def check_pattern_fits(source: Path, options: Options) -> None:
    """Refuse before any work when M does not divide some decoder matrix's inputs."""
    if options.nm is None:
        return
    config = json.loads((Path(source) / "config.json").read_text())
    widths = {"hidden_size": config.get("hidden_size"),
              "intermediate_size": config.get("intermediate_size"),
              "attention output (heads × head_dim)": attention_shape(config).width}
    group = options.nm[1]
    for what, width in widths.items():
        if width and width % group:
            raise UserError(f"pattern {options.pattern}: M={group} does not divide the model's "
                            f"{what} {width}: choose an M that divides it (e.g. 2:4)")


def magnitude_rows(W: torch.Tensor, _H: torch.Tensor | None, options: Options) -> torch.Tensor:
    return W * ~lowest_mask(W.abs(), options)


def wanda_rows(W: torch.Tensor, H: torch.Tensor, options: Options) -> torch.Tensor:
    """|W_ij|·‖X_j‖: diag(H) is ‖X_j‖² up to a constant factor, which does not change a row's order."""
    norms = torch.diag(H).clamp(min=0).sqrt()
    return W * ~lowest_mask(W.abs() * norms[None, :], options)


def sparsegpt_rows(W: torch.Tensor, H: torch.Tensor, options: Options) -> torch.Tensor:
    """OBS pruning: each lazy block's mask is the lowest W²/[H⁻¹]²_jj per row (N:M: per
    group of M columns, chosen as the group comes up, after earlier updates); a zeroed
    weight's error moves into the row's later columns."""
    W = W.clone().float()
    W[:, torch.diag(H) == 0] = 0  # dead inputs: nothing to preserve
    Hinv, _ = inverse_factor(H, options.damp)
    diag = torch.diag(Hinv)
    mask = torch.zeros_like(W, dtype=torch.bool)  # True: pruned
    nm = options.nm
    block = options.block if nm is None else max(options.block // nm[1], 1) * nm[1]

    def choose_block(i1: int, W1: torch.Tensor) -> None:
        if nm is None:
            cols = slice(i1, i1 + W1.shape[1])
            mask[:, cols] = lowest_mask(W1 ** 2 / diag[cols][None, :] ** 2, options)

    def prune_column(i: int, w: torch.Tensor, W1: torch.Tensor) -> torch.Tensor:
        if nm is not None and i % nm[1] == 0:
            local = i % block
            cols = slice(i, i + nm[1])
            mask[:, cols] = lowest_mask(W1[:, local:local + nm[1]] ** 2 / diag[cols][None, :] ** 2,
                                        options)
        return w * ~mask[:, i]

    return obs_sweep(W, Hinv, prune_column, block, choose_block) * ~mask


ROW_PRUNERS = {"magnitude": magnitude_rows, "wanda": wanda_rows, "sparsegpt": sparsegpt_rows}


def lowest_mask(score: torch.Tensor, options: Options) -> torch.Tensor:
    """True where a weight is pruned: the lowest `sparsity` of each row's scores, or with
    N:M the lowest M−N of every M consecutive scores of a row."""
    rows, cols = score.shape
    if options.nm is not None:
        keep, group = options.nm
        grouped = score.reshape(rows, cols // group, group)
        lowest = torch.topk(grouped, group - keep, dim=-1, largest=False).indices
        mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, lowest, True)
        return mask.reshape(rows, cols)
    count = int(cols * options.sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count:
        mask.scatter_(1, torch.topk(score, count, dim=1, largest=False).indices, True)
    return mask


def prune_without_calibration(source: Path, dest: Path, options: Options, progress) -> None:
    """Magnitude pruning needs no activations: read, prune and write one layer at a time."""
    from edgellm.compress.layerwise import ShardWriter, TensorStore, copy_side_files

    store = TensorStore(source)
    config = json.loads((Path(source) / "config.json").read_text())
    layers = config["num_hidden_layers"]
    writer = ShardWriter(dest, layers + 1)
    task = progress.add_task("layers", total=layers)
    for index in range(layers):
        prefix = f"model.layers.{index}."
        tensors = {n: store.get(n) for n in store.names() if n.startswith(prefix)}
        for name, tensor in tensors.items():
            if tensor.dim() == 2 and name.endswith("_proj.weight"):
                tensors[name] = magnitude_rows(tensor, None, options)
        writer.write(tensors)
        progress.advance(task)
    writer.write({n: store.get(n) for n in store.names() if not n.startswith("model.layers.")})
    writer.close()
    copy_side_files(source, dest)
