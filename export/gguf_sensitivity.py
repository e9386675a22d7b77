"""How much each GGUF tensor's rounding to each llama.cpp type costs, in predicted KL divergence.

The damage of replacing weights W by Ŵ is predicted with the diagonal Fisher information
of the model's next-token loss on calibration text (Hessian-free, as in SqueezeLLM and
HAWQ): KL(p_W ‖ p_Ŵ) ≈ ½ Σ F ⊙ (W − Ŵ)², additive over tensors, in nats per token, so the
tied embedding, an attention projection and an MLP matrix are priced in one currency.
F is averaged over each matrix's rows (one value per input column, so the damage of a
column is its mean Fisher times its summed squared error): llama.cpp's converter permutes
some rows (Llama's q/k), columns never move, so the per-column means line up with the GGUF
tensor whatever the family. Ŵ is what llama.cpp itself writes: the f32 GGUF is
quantized once per candidate type (`pure`, with the importance matrix), and each tensor
read back and dequantized by gguf-py. No maintained library prices llama.cpp's own
per-tensor rounding on the user's model; llama.cpp's quantizer and gguf-py do the rounding
and the decoding, the Fisher pass is torch autograd.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np

from edgellm.artifacts import atomic_path, sha256_json

FISHER_WINDOWS = 16  # calibration windows the Fisher pass reads (~10 s each for 135M on 2 cores)


def fisher_columns(model_dir: Path, text: str, seqlen: int, cache: Path) -> dict[str, np.ndarray]:
    """{GGUF tensor name: per-token Fisher information averaged over rows, one per column}."""
    if cache.is_file():
        with np.load(cache) as stored:
            return {name: stored[name] for name in stored.files}
    import torch

    from edgellm.export.imatrix import calibration_windows, gguf_name_map
    from edgellm.models import load_folder_model

    windows = calibration_windows(model_dir, text, FISHER_WINDOWS, seqlen)
    name_map = gguf_name_map(model_dir)
    model = load_folder_model(model_dir)
    params = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    for p in model.parameters():
        p.requires_grad_(p.dim() == 2)
    sums = {name: torch.zeros(p.shape[1]) for name, p in params.items()}
    for window in windows:
        ids = torch.from_numpy(window.astype(np.int64))[None]
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for name, p in params.items():
            if p.grad is not None:  # ∇ of the mean over T tokens: T·E[g²] is per token
                sums[name] += (p.grad.float() ** 2).sum(dim=0) * (len(window) - 1)
    fisher = {}
    for name, total in sums.items():
        target = name_map.get_name(name, try_suffixes=(".weight",))
        if target:
            rows = params[name].shape[0]
            fisher[target] = (total / (len(windows) * rows)).numpy().astype(np.float32)
    with atomic_path(cache) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **fisher)
    return fisher


def damage_table(f32_gguf: Path, fisher: dict[str, np.ndarray], candidates: tuple[str, ...],
                 work: Path, imatrix: dict | None) -> tuple[dict[str, dict[str, tuple[int, float]]], int]:
    """({tensor: {ggml type: (bytes, predicted KL)}}, fixed bytes): every matrix in every
    candidate type llama.cpp writes it in (a type a tensor's width does not fit is left out:
    llama.cpp would fall back to another), and the bytes of the file that are not priced
    matrices, measured from llama.cpp's q8_0 file (the final write's base type), each
    matrix padded to GGUF's alignment. Cached in `work` by the f32 file, Fisher, importance
    matrix and candidates."""
    key = sha256_json({"f32": f32_gguf.stat().st_size, "mtime": f32_gguf.stat().st_mtime_ns,
                       "fisher": {k: float(v.sum()) for k, v in fisher.items()},
                       "imatrix": {k: float(v.sum()) for k, v in (imatrix or {}).items()},
                       "candidates": list(candidates), "layout": "table+fixed"})[:16]
    cache = work / f"gguf-damage-{key}.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        return stored["table"], stored["fixed"]
    weights = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(f32_gguf).tensors
               if len(t.shape) == 2}
    fallback = float(np.mean([f.mean() for f in fisher.values()]))  # a tensor no parameter maps to
    table: dict[str, dict[str, tuple[int, float]]] = {name: {} for name in weights}
    for candidate in dict.fromkeys((*candidates, "q8_0")):  # q8_0 also measures the fixed bytes
        with _pure_file(f32_gguf, candidate, work, imatrix) as path:
            if candidate == "q8_0":
                file_bytes, matrix_bytes = path.stat().st_size, {}
            for name, kind, nbytes, rounded in _matrices(path):
                if candidate == "q8_0":
                    matrix_bytes[name] = nbytes
                if candidate not in candidates or name not in weights or kind != candidate.upper():
                    continue
                column_error = ((rounded.reshape(weights[name].shape) - weights[name]) ** 2).sum(axis=0)
                column_fisher = fisher.get(name, np.full(column_error.shape, fallback))
                table[name][kind] = (nbytes, 0.5 * float((column_fisher * column_error).sum()))
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    fixed = file_bytes - sum(-(-b // align) * align for n, b in matrix_bytes.items() if table.get(n))
    with atomic_path(cache) as tmp:
        Path(tmp).write_text(json.dumps({"table": table, "fixed": fixed}))
    return table, fixed


@contextmanager
def _pure_file(f32_gguf: Path, candidate: str, work: Path, imatrix: dict | None):
    """The f32 GGUF as llama.cpp quantizes it to `candidate` alone; removed after use."""
    from edgellm.export.gguf import BUDGET_TYPES, quantize_gguf

    path = work / f"sensitivity-{candidate}.gguf"
    quantize_gguf(f32_gguf, path, BUDGET_TYPES[candidate], imatrix=imatrix, pure=True)
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _matrices(path: Path):
    """(name, ggml type, bytes, dequantized values) of each matrix of a GGUF."""
    for tensor in gguf.GGUFReader(path).tensors:
        if len(tensor.shape) == 2:
            values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            yield tensor.name, tensor.tensor_type.name, int(tensor.n_bytes), values
