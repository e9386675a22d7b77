"""Structured width pruning: remove FFN channels and attention heads, leaving a smaller dense model.

Importance is measured on calibration text, Wanda-style but per structure: an FFN channel j
scores ‖X_j‖·‖W_down[:, j]‖ (its activation's norm times the size of what it writes back);
an attention head scores the sum of the same over its columns of o_proj's input. Heads go
by whole key/value groups (a KV head and the query heads that share it), so grouped-query
attention stays valid. Every layer keeps the same number of channels and groups (the config
holds one width); the kept FFN width is a multiple of 32 so GGUF's 32-wide quantization
blocks still fit. The config's intermediate_size, head counts and explicit head_dim follow,
and transformers, the GGUF exporter and the ONNX exporter read the result as a plain model.
Written here because it is a few tensor slices driven by one measurement; the libraries
that do this (torch-pruning, LLM-Pruner) rewrite modules generically through their own
dependency graphs and know nothing of GGUF's block constraint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgellm.compress.calibration import run_windows
from edgellm.errors import UserError

FFN_MULTIPLE = 32  # GGUF quantization block width along down_proj's inputs


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ffn: float = Field(0.0, ge=0, lt=1)  # fraction of FFN intermediate channels removed
    heads: float = Field(0.0, ge=0, lt=1)  # fraction of key/value head groups removed
    samples: int | None = Field(None, gt=0)  # calibration windows; default [calibration].samples

    @model_validator(mode="after")
    def _something(self):
        if self.ffn == 0 and self.heads == 0:
            raise ValueError("width pruning needs ffn > 0 or heads > 0")
        return self


def apply(source: Path, dest: Path, options: Options, context) -> None:
    from edgellm.archs import attention_shape, check_support, family_of
    from edgellm.compress.calibration import calibration_ids
    from edgellm.compress.layerwise import copy_side_files
    from edgellm.models import load_folder_model

    config = json.loads((Path(source) / "config.json").read_text())
    family = family_of(config, str(source))
    check_support(family, "width pruning (separate q/k/v and gate/up projections)", family.width)
    ffn_keep = kept_ffn(config["intermediate_size"], options.ffn)
    shape = attention_shape(config)
    groups = shape.kv_heads
    groups_keep = kept_groups(groups, options.heads)
    cal = context.calibration
    ids = calibration_ids(source, cal.text, options.samples or cal.samples, cal.seqlen)
    model = load_folder_model(source)
    norms = input_norms(model, ids)
    state = model.state_dict()
    head_dim, per_group = shape.head_dim, shape.per_group
    for index, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{index}."
        ffn_channels = top(ffn_scores(layer, norms[index]["down"]), ffn_keep)
        kept = top(group_scores(layer, norms[index]["o"], head_dim, per_group), groups_keep)
        slice_layer(state, prefix, ffn_channels, kept, head_dim, per_group)
    model.config.intermediate_size = ffn_keep
    model.config.num_key_value_heads = groups_keep
    model.config.num_attention_heads = groups_keep * per_group
    model.config.head_dim = head_dim
    if context.console:
        context.console.print(f"width: FFN {config['intermediate_size']} → {ffn_keep} channels, "
                              f"KV groups {groups} → {groups_keep}")
    copy_side_files(source, dest)
    save_smaller(model.config, state, dest)


def kept_ffn(width: int, fraction: float) -> int:
    keep = round(width * (1 - fraction) / FFN_MULTIPLE) * FFN_MULTIPLE
    if fraction and keep >= width:
        keep = width - FFN_MULTIPLE
    if keep <= 0:
        raise UserError(f"width ffn {fraction} leaves no FFN channels of {width}: choose a smaller ffn")
    return keep


def kept_groups(groups: int, fraction: float) -> int:
    keep = groups - round(groups * fraction)
    if keep <= 0:
        raise UserError(f"width heads {fraction} removes all {groups} key/value head groups: "
                        "choose a smaller heads fraction")
    if fraction and keep == groups:
        raise UserError(f"width heads {fraction} of {groups} key/value head groups rounds to none: "
                        f"choose at least {0.5 / groups:.2f}")
    return keep


@torch.no_grad()
def input_norms(model, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer, Σ x_j² over the calibration tokens of down_proj's and o_proj's inputs."""
    layers = model.model.layers
    sums = [{"down": 0.0, "o": 0.0} for _ in layers]

    def hook_for(index, key):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[index][key] = sums[index][key] + (x ** 2).sum(dim=0)
        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook_for(index, "down")))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(hook_for(index, "o")))
    run_windows(model, ids, handles)
    return [{k: v.sqrt() for k, v in layer.items()} for layer in sums]


def ffn_scores(layer, norms: torch.Tensor) -> torch.Tensor:
    return norms * layer.mlp.down_proj.weight.float().norm(dim=0)


def group_scores(layer, norms: torch.Tensor, head_dim: int, per_group: int) -> torch.Tensor:
    columns = norms * layer.self_attn.o_proj.weight.float().norm(dim=0)
    return columns.reshape(-1, per_group * head_dim).sum(dim=1)


def top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in their original order."""
    return torch.sort(torch.topk(scores, keep).indices).values


def slice_layer(state: dict, prefix: str, ffn: torch.Tensor, groups: torch.Tensor,
                head_dim: int, per_group: int) -> None:
    def rows(name, index):
        state[prefix + name] = state[prefix + name][index].contiguous()

    def cols(name, index):
        state[prefix + name] = state[prefix + name][:, index].contiguous()

    rows("mlp.gate_proj.weight", ffn)
    rows("mlp.up_proj.weight", ffn)
    cols("mlp.down_proj.weight", ffn)
    kv = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
    q = (groups[:, None] * per_group * head_dim + torch.arange(per_group * head_dim)).flatten()
    for name in ("self_attn.k_proj", "self_attn.v_proj"):
        rows(f"{name}.weight", kv)
        if prefix + f"{name}.bias" in state:
            rows(f"{name}.bias", kv)
    rows("self_attn.q_proj.weight", q)
    if prefix + "self_attn.q_proj.bias" in state:
        rows("self_attn.q_proj.bias", q)
    cols("self_attn.o_proj.weight", q)


def save_smaller(config, state: dict, dest: Path) -> None:
    """A fresh model of the new config, loaded strictly with the sliced weights, saved."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(dest, safe_serialization=True)
