"""SmoothQuant scale migration (Xiao et al. 2023): move activation outliers into the weights.

Per input channel j of a group of linear layers, s_j = max|X_j|^α / max|W_j|^(1−α), with
the activation maxima measured on the calibration text; the module producing those
channels is divided by s and the consumers' weight columns multiplied by s. Four places
per Llama-style decoder layer allow that without changing the function (each family's
file in edgellm/archs/ lists its own: Gemma 3's MLP input is pre_feedforward_layernorm and
its norms are x̂·(1 + w); Phi-3's fused projections allow only the two norm migrations):

  input_layernorm → q/k/v_proj          the norm's weight divided by s (the paper's case)
  post_attention_layernorm → gate/up    the same
  up_proj → down_proj                   up_proj's output rows divided by s: down_proj's input
                                        is silu(gate)·up, linear in up. SmolLM2's INT8 loss
                                        sits here: leaving down_proj in float took
                                        per-tensor dynamic INT8 from +52% to +2.1% (2,048 tokens)
  v_proj → o_proj                       v_proj's output rows: attention is linear in V (with
                                        grouped KV heads, one v channel feeds every query head
                                        of its group, so s is shared across the group)

The float model computes the same function, but its activations lose the outlier channels
that one int8 scale per token (torchao) or per tensor (ONNX Runtime's MatMulInteger)
cannot hold: the step before dynamic INT8. Written here because the maintained
implementations (llm-compressor's SmoothQuantModifier, Intel Neural Compressor) each pull
a framework far larger than these few lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from edgellm.compress.calibration import run_windows
from edgellm.errors import UserError


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.5, gt=0, le=1)  # how much of the outliers moves into the weights


def apply(source: Path, dest: Path, options: Options, context) -> None:
    from edgellm.compress.calibration import calibration_ids
    from edgellm.compress.layerwise import copy_side_files
    from edgellm.models import load_folder_model

    model = load_folder_model(source)
    cal = context.calibration
    ids = calibration_ids(source, cal.text, cal.samples, cal.seqlen)
    migrations = migrations_of(model)
    maxima = input_maxima(model, [m.consumers[0] for m in migrations], ids)
    with torch.no_grad():
        for migration in migrations:
            migration.apply(maxima[migration.consumers[0]], options.alpha)
    copy_side_files(source, dest)
    model.save_pretrained(dest, safe_serialization=True)


@dataclass
class Migration:
    """Where a per-channel scale can move: the producer's output channels are divided by s,
    the consumers' input columns multiplied by s. With `repeat` > 1 (v_proj → o_proj under
    grouped KV heads) each producer channel feeds `repeat` consumer channels, one per query
    head of its group, and those share one scale."""

    producer: torch.nn.Module  # an RMSNorm (its weight vector) or a Linear (its weight rows)
    consumers: list[torch.nn.Linear]
    repeat: int = 1
    head_dim: int = 0
    norm_offset: float = 0.0  # the norm computes x̂·(offset + w) (Gemma: 1)

    def per_producer_channel(self, per_input: torch.Tensor) -> torch.Tensor:
        if self.repeat == 1:
            return per_input
        return per_input.reshape(-1, self.repeat, self.head_dim).amax(dim=1).reshape(-1)

    def per_input_channel(self, scale: torch.Tensor) -> torch.Tensor:
        if self.repeat == 1:
            return scale
        groups = scale.reshape(-1, 1, self.head_dim)
        return groups.expand(-1, self.repeat, self.head_dim).reshape(-1)

    def apply(self, act_max: torch.Tensor, alpha: float) -> None:
        weight_max = torch.stack([c.weight.abs().amax(dim=0) for c in self.consumers]).amax(dim=0)
        act = self.per_producer_channel(act_max).clamp(min=1e-5)
        weight = self.per_producer_channel(weight_max).clamp(min=1e-5)
        self.move((act ** alpha / weight ** (1 - alpha)).clamp(min=1e-5))

    def move(self, scale: torch.Tensor) -> None:
        """Divide the producer's output channels by `scale` (one per producer channel) and
        multiply the consumers' matching input columns by it: the same function."""
        if isinstance(self.producer, torch.nn.Linear):
            self.producer.weight.div_(scale[:, None])
            if self.producer.bias is not None:
                self.producer.bias.div_(scale)
        else:  # (offset + w) / s = offset + w'
            weight = self.producer.weight
            weight.copy_((weight + self.norm_offset) / scale - self.norm_offset)
        for consumer in self.consumers:
            consumer.weight.mul_(self.per_input_channel(scale)[None, :])


def migrations_of(model) -> list[Migration]:
    """Each decoder layer's migrations, as its family's description lists them
    (edgellm/archs/: which norm or linear feeds which linears)."""
    config = model.config.to_dict()
    layers = getattr(getattr(model, "model", None), "layers", [])
    migrations = [m for layer in layers for m in layer_migrations(layer, config)]
    if not migrations:
        raise UserError(f"smoothquant has no migrations for {type(model).__name__}: see the "
                        "family's `smooth` list in edgellm/archs/")
    return migrations


def layer_migrations(layer: torch.nn.Module, config: dict) -> list[Migration]:
    """One decoder layer's migrations (`config`: the model's config.json fields); none for
    a family whose description lists none."""
    from edgellm.archs import attention_shape, family_of

    family = family_of(config)
    shape = attention_shape(config)
    migrations = []
    for smooth in family.smooth:
        producer = layer.get_submodule(smooth.producer)
        consumers = [layer.get_submodule(name) for name in smooth.consumers]
        migrations.append(Migration(
            producer, consumers, shape.per_group if smooth.heads else 1,
            shape.head_dim if smooth.heads else 0,
            0.0 if isinstance(producer, torch.nn.Linear) else family.norm_offset))
    return migrations


@torch.no_grad()
def input_maxima(model, linears: list[torch.nn.Linear], ids: torch.Tensor) -> dict:
    """max |x_j| over the calibration tokens of each linear's input channels."""
    maxima: dict = {}

    def hook_for(linear):
        def hook(_module, args):
            x = args[0]
            current = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            maxima[linear] = torch.maximum(maxima[linear], current) if linear in maxima else current
        return hook

    handles = [linear.register_forward_pre_hook(hook_for(linear)) for linear in linears]
    run_windows(model, ids, handles)
    return maxima
