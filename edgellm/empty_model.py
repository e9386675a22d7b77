"""A transformers model made from a folder's config.json with its parameters on the meta
device, then given tensors edgellm read itself (a GPTQ checkpoint dequantized, an int8
folder's float tensors): no float copy of the weights is ever initialised."""

from __future__ import annotations

from pathlib import Path

import torch

from edgellm.errors import UserError


def plain_config(folder: Path):
    """config.json without its quantization_config (edgellm reads the tensors itself)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def empty_model(config, dtype=torch.float32):
    """Parameters on meta, buffers real (Gemma 3's embedding scale is a non-persistent buffer)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def assign_state(model, state: dict[str, torch.Tensor], mismatch: str):
    """Put `state` in place of the meta parameters; `mismatch` (with {name}) is the one-line
    error when a tensor is missing or left over."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(mismatch.replace("{name}", (missing or unexpected)[0]))
    # buffers made on meta (rotary frequencies) are recomputed on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model.eval()
