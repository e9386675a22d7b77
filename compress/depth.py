"""Structured depth pruning: drop whole decoder layers chosen by a score measured on calibration text.

  select = "block"   (Gromov et al. 2024) drop the n consecutive layers whose input and
                     output hidden states are closest in angle: arccos(cos(h_l, h_l+n))/π
                     averaged over the calibration tokens
  select = "layers"  (Men et al. 2024, ShortGPT) drop the n layers of lowest block
                     influence 1 − cos(h_in, h_out), wherever they are

n = round(drop × layers). The result is a dense model with fewer layers: config, layer
indices (the KV cache's) and weights renumbered, which transformers and both exporters read
as any other model. `depth.json` beside the weights records every score and which teacher
layer each kept layer was (distillation maps hidden states with it). Written here because
the scoring is a dozen lines over transformers' hidden states; no library ships it apart
from a training framework.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from edgellm.errors import UserError

RECORD = "depth.json"


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    drop: float = Field(0.25, gt=0, lt=1)  # fraction of decoder layers removed
    select: Literal["block", "layers"] = "block"
    samples: int | None = Field(None, gt=0)  # calibration windows; default [calibration].samples


def apply(source: Path, dest: Path, options: Options, context) -> None:
    from edgellm.compress.calibration import calibration_ids
    from edgellm.compress.layerwise import copy_side_files
    from edgellm.models import load_folder_model

    config = json.loads((Path(source) / "config.json").read_text())
    total = config.get("num_hidden_layers", 0)
    count = layers_to_drop(total, options.drop)
    cal = context.calibration
    ids = calibration_ids(source, cal.text, options.samples or cal.samples, cal.seqlen)
    model = load_folder_model(source)
    angular, influence = layer_scores(model, ids)
    dropped = choose(angular, influence, count, options.select)
    kept = [i for i in range(total) if i not in dropped]
    if context.console:
        context.console.print(f"depth: dropping layers {dropped} of {total} ({options.select})")
    remove_layers(model, kept)
    copy_side_files(source, dest)
    model.save_pretrained(dest, safe_serialization=True)
    record = {"dropped": dropped, "kept": teacher_layers(source, kept), "select": options.select,
              "block_angular_distance": angular[count].tolist() if count < len(angular) else [],
              "block_influence": influence.tolist()}
    (Path(dest) / RECORD).write_text(json.dumps(record, indent=2) + "\n")


def layers_to_drop(total: int, drop: float) -> int:
    count = round(total * drop)
    if count >= total:
        raise UserError(f"depth drop {drop} removes all {total} layers: choose a smaller drop")
    if count == 0:
        raise UserError(f"depth drop {drop} of {total} layers rounds to none: choose a larger drop")
    return count


@torch.no_grad()
def layer_scores(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """angular[n][l]: mean angular distance between the input of layer l and the output of
    layer l+n−1 (n ≥ 1); influence[l]: mean 1 − cos between layer l's input and output."""
    layers = model.model.layers
    states: list[torch.Tensor] = []
    handles = [layers[0].register_forward_pre_hook(
        lambda _m, args, kwargs: states.append(_hidden(args, kwargs)), with_kwargs=True)]
    handles += [layer.register_forward_hook(lambda _m, _a, out: states.append(_first(out)))
                for layer in layers]
    total = len(layers)
    angular = [torch.zeros(total - n + 1) for n in range(total + 1)]
    influence = torch.zeros(total)
    try:
        for window in ids:
            states.clear()
            model(input_ids=window[None], use_cache=False)
            h = torch.nn.functional.normalize(torch.stack(states)[:, 0].float(), dim=-1)
            for n in range(1, total + 1):
                cos = (h[:-n] * h[n:]).sum(-1).clamp(-1, 1)  # [total−n+1, tokens]
                angular[n] += (torch.arccos(cos) / torch.pi).mean(-1)
                if n == 1:
                    influence += (1 - cos).mean(-1)
    finally:
        for handle in handles:
            handle.remove()
    return [a / len(ids) for a in angular], influence / len(ids)


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def choose(angular: list[torch.Tensor], influence: torch.Tensor, count: int,
           select: str) -> list[int]:
    if select == "block":
        start = int(torch.argmin(angular[count]))
        return list(range(start, start + count))
    return sorted(int(i) for i in torch.argsort(influence)[:count])


def remove_layers(model, kept: list[int]) -> None:
    """Keep only the `kept` decoder layers, renumbered; the config follows (with every list
    the family's description says holds one entry per layer)."""
    from edgellm.archs import family_of

    inner = model.model
    inner.layers = torch.nn.ModuleList(inner.layers[i] for i in kept)
    for index, layer in enumerate(inner.layers):
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = index
    config = model.config
    config.num_hidden_layers = len(kept)
    for key in family_of(config.to_dict()).layer_lists:  # one entry per layer: keep the kept
        values = getattr(config, key, None)
        if isinstance(values, list) and len(values) > max(kept):
            setattr(config, key, [values[i] for i in kept])


def teacher_layers(source: Path, kept: list[int]) -> list[int]:
    """Which layer of the original model each kept layer is (through earlier depth steps)."""
    earlier = Path(source) / RECORD
    if earlier.is_file():
        original = json.loads(earlier.read_text())["kept"]
        return [original[i] for i in kept]
    return kept
