"""How much each GGUF tensor's rounding to each llama.cpp type costs, in predicted KL divergence.

The damage of replacing weights W by Ŵ is ½ Σ F ⊙ (W − Ŵ)² with F the diagonal Fisher
information per column (export/fisher.py), mapped onto GGUF tensor names (llama.cpp's
converter permutes some rows, never columns). Ŵ is what llama.cpp itself writes: the f32 GGUF is
quantized once per candidate type (`pure`, with the importance matrix), and each tensor
found by edgellm's GGUF walk (edgellm/gguf_bounds.py) and dequantized by gguf-py. No
maintained library prices llama.cpp's own per-tensor rounding on the user's model;
llama.cpp's quantizer and gguf-py do the rounding and the decoding, the Fisher pass is
torch autograd.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np

from edgellm.artifacts import sha256_json
from edgellm.export.allocation import cached_table
from edgellm.gguf_bounds import read_gguf_meta, tensor_array


def fisher_columns(model_dir: Path, calibration, work: Path) -> dict[str, np.ndarray]:
    """{GGUF tensor name: per-token Fisher information averaged over rows, one per column}."""
    from edgellm.export.fisher import fisher_by_parameter
    from edgellm.export.imatrix import gguf_name_map

    name_map = gguf_name_map(model_dir)
    fisher = {}
    for name, columns in fisher_by_parameter(model_dir, calibration, work).items():
        target = name_map.get_name(name, try_suffixes=(".weight",))
        if target:
            fisher[target] = columns
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
    stored = cached_table(work / f"gguf-damage-{key}.json",
                          lambda: _measured_table(f32_gguf, fisher, candidates, work, imatrix))
    return stored["table"], stored["fixed"]


def _measured_table(f32_gguf: Path, fisher: dict[str, np.ndarray], candidates: tuple[str, ...],
                    work: Path, imatrix: dict | None) -> dict:
    """damage_table's value, computed: each candidate's pure file written by llama.cpp and
    read back matrix by matrix."""
    weights = {name: values for name, _kind, _nbytes, values in _matrices(f32_gguf)}
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
    return {"table": table, "fixed": fixed}


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
    """(name, ggml type, bytes, dequantized values) of each matrix of a GGUF (its tensor
    table read by edgellm's walk: gguf-py's reader takes seconds a file over a large
    vocabulary)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, span in read_gguf_meta(path).spans.items():
        if len(span.shape) == 2:
            values = gguf.quants.dequantize(tensor_array(data, span), span.kind)
            yield name, span.kind.name, span.nbytes, values.reshape(span.shape)
