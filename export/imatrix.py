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
from edgellm.data import read_text, resolve_text, token_windows, tokenize
from edgellm.source_meta import bos_of_folder


def compute_imatrix(model_dir: Path, text: str, samples: int, seqlen: int,
                    cache: Path) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean of squared inputs per column}; cached in `cache` (.npz)."""
    if cache.is_file():
        with np.load(cache) as stored:
            return {name: stored[name] for name in stored.files}
    import torch

    from edgellm.models import load_folder_model

    name_map = gguf_name_map(model_dir)
    windows = calibration_windows(model_dir, text, samples, seqlen)
    model = load_folder_model(model_dir)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def collect(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return collect

    handles = []
    for module_name, module in model.named_modules():
        target = name_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if isinstance(module, torch.nn.Linear) and target and module_name != "lm_head":
            handles.append(module.register_forward_hook(hook(target)))
    with torch.inference_mode():  # the decoder alone: lm_head is not weighed, so no logits
        for window in windows:
            model.base_model(input_ids=torch.from_numpy(window.astype(np.int64))[None],
                             use_cache=False)
    for handle in handles:
        handle.remove()
    matrix = {name: (sums[name] / counts[name]).numpy().astype(np.float32) for name in sums}
    tmp = cache.with_name(cache.stem + ".partial.npz")
    np.savez(tmp, **matrix)
    tmp.replace(cache)
    return matrix


def calibration_windows(model_dir: Path, text: str, samples: int, seqlen: int) -> list[np.ndarray]:
    """Up to `samples` windows of `seqlen` ids of the calibration text, BOS first where the
    model's tokenizer adds it (as the evaluation windows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = resolve_text(text)
    bos = bos_of_folder(model_dir)
    ids = tokenize(tokenizer, read_text(path)[0], samples * (seqlen - (bos is not None)))
    return token_windows(ids, seqlen, source=str(path), bos=bos)


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
