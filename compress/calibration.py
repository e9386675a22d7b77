"""Calibration windows: the recipe's [calibration] text (never the evaluation text) as
`samples` windows of `seqlen` token ids, tokenized by the model's own tokenizer, each
starting with BOS where the model's tokenizer adds one (as evaluation windows do)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgellm.data import read_text, resolve_text, tokenize
from edgellm.errors import UserError


def calibration_ids(model_dir: Path, text: str, samples: int, seqlen: int) -> torch.Tensor:
    """A [samples, seqlen] int64 tensor of consecutive non-overlapping windows of the text."""
    from transformers import AutoTokenizer

    from edgellm.models import quiet_transformers
    from edgellm.source_meta import bos_of_folder

    quiet_transformers()
    path = resolve_text(text)
    body, _ = read_text(path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    bos = bos_of_folder(model_dir)  # windows start with BOS where the model's text does
    width = seqlen - 1 if bos is not None else seqlen
    ids = tokenize(tokenizer, body, samples * width)
    if len(ids) < samples * width:
        raise UserError(
            f"calibration text {path} has {len(ids)} tokens, fewer than samples × seqlen = "
            f"{samples} × {seqlen}: lower samples/seqlen or use a longer text")
    windows = torch.from_numpy(ids.astype(np.int64)).reshape(samples, width)
    if bos is not None:
        windows = torch.cat([torch.full((samples, 1), bos, dtype=torch.int64), windows], dim=1)
    return windows


@torch.no_grad()
def run_windows(model, ids: torch.Tensor, handles: list) -> None:
    """Run the model over each calibration window for its hooks' sake, then remove the hooks."""
    try:
        for window in ids:
            model(input_ids=window[None], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
