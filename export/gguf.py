"""HF folder → GGUF file: float types written with the official `gguf` writer, quantized
types made from an f32 GGUF by llama.cpp's own quantizer (`llama_model_quantize`).

The same file loads in llama.cpp unchanged: it is what laptop and phone apps embed.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open

from edgellm.artifacts import atomic_path
from edgellm.errors import UserError
from edgellm.export.gguf_arch import arch_for
from edgellm.export.gguf_vocab import add_vocab

FLOAT_TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
}
# llama.cpp's quantizer file types, by the names llama-quantize uses.
QUANT_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
GGUF_WEIGHTS = tuple(FLOAT_TYPES) + tuple(QUANT_TYPES)


def export_gguf(folder: Path, out_path: Path, weights: str, work_dir: Path,
                imatrix: dict | None = None) -> Path:
    """Write `out_path` in the requested weight type; `work_dir` keeps the f32 intermediate.
    `imatrix` ({tensor name: mean squared input per column}) guides quantized types."""
    if weights in FLOAT_TYPES:
        write_float_gguf(folder, out_path, weights)
    elif weights in QUANT_TYPES:
        source = work_dir / "model-f32.gguf"
        if not source.is_file():
            write_float_gguf(folder, source, "f32")
        quantize_gguf(source, out_path, weights, imatrix=imatrix)
    else:
        raise UserError(f"GGUF weights '{weights}' unknown: use one of {', '.join(GGUF_WEIGHTS)}")
    return out_path


def write_float_gguf(folder: Path, out_path: Path, weights: str) -> None:
    """Convert an HF folder (safetensors) to a GGUF file of float tensors."""
    config = json.loads((folder / "config.json").read_text())
    arch = arch_for(config)
    file_type, tensor_type = FLOAT_TYPES[weights]
    name_map = gguf.get_tensor_name_map(arch.arch, config["num_hidden_layers"])
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.arch])
        writer.add_name(config.get("_name_or_path") or folder.name)
        writer.add_file_type(file_type)
        arch.write_hparams(writer, config)
        add_vocab(writer, folder, config["vocab_size"])
        for hf_name, data in _hf_tensors(folder, config):
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"tensor {hf_name} in {folder} has no GGUF name: unsupported model")
            data = arch.transform(hf_name, data, config)
            _add_tensor(writer, gguf_name, data, tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _hf_tensors(folder: Path, config: dict):
    """(name, float32 array) for each stored tensor; a tied lm_head is left out."""
    tied = config.get("tie_word_embeddings", False)
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                if tied and name == "lm_head.weight":
                    continue
                yield name, handle.get_tensor(name).float().numpy()


def _add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, tensor_type) -> None:
    if data.ndim == 1 or tensor_type == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif tensor_type == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        packed = gguf.quants.quantize(data.astype(np.float32), tensor_type)
        writer.add_tensor(name, packed, raw_dtype=tensor_type)  # shape read from the bytes


def quantize_gguf(source: Path, out_path: Path, weights: str, threads: int = 0,
                  imatrix: dict | None = None) -> None:
    """Quantize with llama.cpp's quantizer, exactly as `llama-quantize` would."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[weights])
    params.nthread = threads
    if imatrix:
        from edgellm.export.imatrix import imatrix_param

        array, _buffers = imatrix_param(imatrix)  # _buffers keeps the data alive until return
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    suffix = "-imatrix" if imatrix else ""
    log = source.parent / f"quantize-{weights}{suffix}.log"
    with atomic_path(out_path) as tmp, native_stderr_to(log):
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if status != 0:
            raise UserError(f"llama.cpp could not quantize {source} to {weights} (status {status})")


@contextmanager
def native_stderr_to(log: Path):
    """Send llama.cpp's per-tensor quantize log to a file: it reaches both the C stderr and,
    through llama-cpp-python's log callback, Python's sys.stderr."""
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    with open(log, "w") as handle:
        os.dup2(handle.fileno(), 2)
        sys.stderr = handle
        try:
            yield
        finally:
            handle.flush()
            sys.stderr = saved_stream
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
