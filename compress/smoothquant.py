"""SmoothQuant scale migration (Xiao et al. 2023): move activation outliers into the weights.

Per input channel j of the linear layers fed by an RMSNorm (q/k/v after the input norm,
gate/up after the post-attention norm), s_j = max|X_j|^α / max|W_j|^(1−α), with the
activation maxima measured on the calibration text; the norm's weight is divided by s and
those layers' weight columns multiplied by s. The float model computes the same function,
but its activations lose the outlier channels that a per-token int8 scale cannot hold:
this is the step before dynamic INT8 (`export = { format = "torch", weights = "int8" }`).
Written here because the maintained implementations (llm-compressor's SmoothQuantModifier,
Intel Neural Compressor) each pull a framework far larger than these few lines.
"""

from __future__ import annotations

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
    pairs = norm_linear_pairs(model)
    maxima = activation_maxima(model, [norm for norm, _ in pairs], ids)
    with torch.no_grad():
        for norm, linears in pairs:
            migrate(norm, linears, maxima[norm], options.alpha)
    copy_side_files(source, dest)
    model.save_pretrained(dest, safe_serialization=True)


def norm_linear_pairs(model) -> list[tuple[torch.nn.Module, list[torch.nn.Linear]]]:
    """(norm, the linears that read its output) for each decoder layer of a Llama-style model."""
    pairs = []
    for layer in getattr(getattr(model, "model", None), "layers", []):
        attn, mlp = layer.self_attn, layer.mlp
        pairs.append((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]))
        pairs.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
    if not pairs:
        raise UserError("smoothquant supports Llama-style decoders (model.layers with "
                        "input_layernorm, self_attn, mlp): this model has none")
    return pairs


@torch.no_grad()
def activation_maxima(model, norms: list[torch.nn.Module], ids: torch.Tensor) -> dict:
    """max |x_j| over the calibration tokens of each norm's output channels."""
    maxima: dict = {}

    def hook_for(norm):
        def hook(_module, _inputs, output):
            current = output.detach().abs().reshape(-1, output.shape[-1]).amax(dim=0).float()
            maxima[norm] = torch.maximum(maxima[norm], current) if norm in maxima else current
        return hook

    handles = [norm.register_forward_hook(hook_for(norm)) for norm in norms]
    run_windows(model, ids, handles)
    return maxima


def migrate(norm, linears: list[torch.nn.Linear], act_max: torch.Tensor, alpha: float) -> None:
    weight_max = torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(dim=0)
    scale = (act_max.clamp(min=1e-5) ** alpha / weight_max.clamp(min=1e-5) ** (1 - alpha))
    scale = scale.clamp(min=1e-5)
    norm.weight.div_(scale)
    for linear in linears:
        linear.weight.mul_(scale[None, :])
