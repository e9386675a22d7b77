"""Importance matrix for llama.cpp quantization, computed in torch on calibration text.

llama.cpp weighs each weight column's rounding error by the mean square of the
activations that multiply it (`llama-imatrix`). llama-cpp-python ships no imatrix tool,
so we collect the same statistic with forward hooks on every linear layer, name it as
the GGUF tensor it belongs to, and hand it to `llama_model_quantize`.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import gguf
import numpy as np

from edgellm.archs import family_of
from edgellm.data import calibration_windows
from edgellm.export.input_sums import InputSums


def compute_imatrix(model_dir: Path, text: str, samples: int, seqlen: int,
                    cache: Path, fisher_cache: Path | None = None) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean of squared inputs per column}; cached in `cache` (.npz).

    With `fisher_cache` (a GGUF size budget needs both), a missing Fisher pass is computed
    in the same pass and written there: its windows are this pass's first ones, so they run
    forward and backward once (export/fisher.py) instead of forward twice, and the model
    loads once (16 of SmolLM2's 64 windows: about 15 s on 2 cores)."""
    if cache.is_file():
        with np.load(cache) as stored:
            return {name: stored[name] for name in stored.files}
    import torch

    from edgellm.export.fisher import FISHER_WINDOWS, FisherSums
    from edgellm.models import load_folder_model

    model = load_folder_model(model_dir)
    squares = input_squares(model, gguf_name_map(model_dir))
    fisher = FisherSums(model) if fisher_cache and not fisher_cache.is_file() else None
    count = max(samples, FISHER_WINDOWS) if fisher else samples
    try:
        for index, window in enumerate(calibration_windows(model_dir, text, count, seqlen)):
            ids = torch.from_numpy(window.astype(np.int64))[None]
            squares.active = index < samples
            if fisher and index < FISHER_WINDOWS:
                fisher.add(ids)
            elif squares.active:  # the decoder alone: the logits' inputs are its output
                with torch.inference_mode():
                    model.base_model(input_ids=ids, use_cache=False)
    finally:
        squares.close()
    if fisher:
        fisher.save(fisher_cache)
    matrix = means(squares)
    tmp = cache.with_name(cache.stem + ".partial.npz")
    np.savez(tmp, **matrix)
    tmp.replace(cache)
    return matrix


def input_squares(model, name_map: gguf.TensorNameMap) -> InputSums:
    """The sums of squared inputs per column of every linear, per GGUF tensor (linears
    reading one tensor, q/k/v and gate/up, square it once). The logits' matrix is weighed
    on the decoder's output (the final norm's), under the name of the tensor llama.cpp
    multiplies: `output.weight`, or `token_embd.weight` when the embedding is tied to it
    (as `llama-imatrix --process-output` does); llama.cpp has no other importance for that
    matrix, a fifth of SmolLM2's weights and 63% of Gemma 3 270M's."""
    import torch

    linears = {}
    for module_name, module in model.named_modules():
        target = name_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if isinstance(module, torch.nn.Linear) and target and module_name != "lm_head":
            linears[target] = module
    squares = InputSums(linears, column_squares)
    logits = logits_tensor(model)

    def decoder_output(_module, _inputs, output):
        if squares.active:
            squares.add(logits, output[0])

    squares.handles.append(model.base_model.register_forward_hook(decoder_output))
    return squares


def column_squares(rows):
    rows = rows.float()
    return (rows * rows).sum(dim=0)


def means(squares: InputSums) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean square per column}, as llama.cpp reads it."""
    return {name: (squares.sums[name] / squares.rows[name]).numpy().astype(np.float32)
            for name in squares.sums}


def logits_tensor(model) -> str:
    """The GGUF tensor the logits multiply: the embedding when lm_head is tied to it."""
    from edgellm.models import has_tied_head

    return "token_embd.weight" if has_tied_head(model) else "output.weight"


def gguf_name_map(model_dir: Path) -> gguf.TensorNameMap:
    """HF parameter names → the GGUF tensor names llama.cpp's converter gives them."""
    config = json.loads((model_dir / "config.json").read_text())
    return gguf.get_tensor_name_map(gguf_arch(config), config["num_hidden_layers"])


def gguf_arch(config: dict) -> gguf.MODEL_ARCH:
    """gguf-py's architecture for the tensor name map, from the family's llama.cpp name."""
    name = family_of(config).gguf_arch
    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)


def imatrix_param(matrix: dict[str, np.ndarray]):
    """A NULL-terminated llama_model_imatrix_data array, with the buffers it points into
    (keep the returned tuple alive while llama.cpp quantizes)."""
    import llama_cpp

    entry = llama_cpp.llama_model_imatrix_data
    array = (entry * (len(matrix) + 1))()
    keep = []
    for i, (name, values) in enumerate(sorted(matrix.items())):
        data = np.ascontiguousarray(values, dtype=np.float32)
        name_bytes = name.encode()
        keep += [data, name_bytes]
        array[i].name = name_bytes
        array[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = data.size
    array[len(matrix)].name = None
    return array, keep
