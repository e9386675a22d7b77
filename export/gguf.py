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
import torch
from safetensors import safe_open

from edgellm.artifacts import atomic_path
from edgellm.compress.gptq_format import PackedLinear, gptq_config, read_packed
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
    `imatrix` ({tensor name: mean squared input per column}) guides quantized types.
    A GPTQ checkpoint whose grid is the requested type's is written block for block."""
    if weights in FLOAT_TYPES:
        write_float_gguf(folder, out_path, weights)
    elif weights in QUANT_TYPES:
        if gguf_blocks_fit(folder, weights):
            write_gguf(folder, out_path, GPTQ_BLOCKS[weights][0], _encode_gptq(weights))
            return out_path
        source = work_dir / "model-f32.gguf"
        if not source.is_file():
            write_float_gguf(folder, source, "f32")
        quantize_gguf(source, out_path, weights, imatrix=imatrix)
    else:
        raise UserError(f"GGUF weights '{weights}' unknown: use one of {', '.join(GGUF_WEIGHTS)}")
    return out_path


def write_float_gguf(folder: Path, out_path: Path, weights: str) -> None:
    """Convert an HF folder (safetensors; GPTQ checkpoints dequantized) to float tensors."""
    file_type, tensor_type = FLOAT_TYPES[weights]

    def encode(_name: str, value):
        data = value.dequantize().numpy() if isinstance(value, PackedLinear) else value
        return _encode_float(data, tensor_type)

    write_gguf(folder, out_path, file_type, encode)


def write_gguf(folder: Path, out_path: Path, file_type, encode) -> None:
    """Write an HF folder as GGUF; `encode(hf_name, value)` turns each tensor (a float array,
    or a PackedLinear of a GPTQ checkpoint) into (array, raw GGML type or None)."""
    config = json.loads((folder / "config.json").read_text())
    arch = arch_for(config)
    name_map = gguf.get_tensor_name_map(arch.arch, config["num_hidden_layers"])
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.arch])
        writer.add_name(config.get("_name_or_path") or folder.name)
        writer.add_file_type(file_type)
        arch.write_hparams(writer, config)
        add_vocab(writer, folder, config["vocab_size"])
        for hf_name, value in _hf_tensors(folder, config):
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise UserError(f"tensor {hf_name} in {folder} has no GGUF name: unsupported model")
            data, raw_dtype = encode(hf_name, value)
            # row transforms (llama's q/k permutation) act on whole rows: packed blocks too
            data = arch.transform(hf_name, data, config)
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def _hf_tensors(folder: Path, config: dict):
    """(name, float32 array) for each stored tensor, a tied lm_head left out; a GPTQ
    checkpoint's quantized linears come as (`….weight`, PackedLinear)."""
    tied = config.get("tie_word_embeddings", False)
    tensors = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"model folder {folder} has no .safetensors weights to export: add them")
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                if not (tied and name == "lm_head.weight"):
                    tensors[name] = handle.get_tensor(name)
    packed = read_packed(folder, tensors) if gptq_config(config) else {}
    for name, tensor in tensors.items():
        prefix, _, part = name.rpartition(".")
        if prefix in packed:
            if part == "qweight":
                yield f"{prefix}.weight", packed[prefix]
            continue
        yield name, tensor.float().numpy()


def _encode_float(data: np.ndarray, tensor_type):
    if data.ndim == 1 or tensor_type == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32), None
    if tensor_type == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data.astype(np.float32), tensor_type), tensor_type


# GPTQ-solved integers go into GGUF blocks as they are (no second rounding):
# weights → (file type, checkpoint bits, zero point, largest integer)
GPTQ_BLOCKS = {
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, 4, 8, 15),
    "q5_0": (gguf.LlamaFileType.MOSTLY_Q5_0, 8, 16, 31),  # 8-bit checkpoint layout
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, 8, 128, 255),
}


def gguf_blocks_fit(folder: Path, weights: str) -> bool:
    """Whether a folder is a GPTQ checkpoint solved on `weights`' grid (edgellm records
    it; for other checkpoints: 4-bit symmetric blocks of 32 are Q4_0's grid, 8-bit Q8_0's)."""
    config_path = folder / "config.json"
    quant = gptq_config(json.loads(config_path.read_text())) if config_path.is_file() else None
    if quant is None or weights not in GPTQ_BLOCKS:
        return False
    if "edgellm_grid" in quant:
        return quant["edgellm_grid"] in (weights, {"q4_0": "nbits4-g32-sym"}.get(weights))
    _, bits, _, _ = GPTQ_BLOCKS[weights]
    return (weights != "q5_0" and int(quant["bits"]) == bits and int(quant["group_size"]) == 32
            and bool(quant.get("sym")))


def _encode_gptq(weights: str):
    """Quantized linears as `weights` blocks from their integers; every other matrix in
    Q8_0 (what llama.cpp gives the tied embedding when the width is not a multiple of 256)
    and vectors in f32."""
    _, bits, zero, top = GPTQ_BLOCKS[weights]

    def encode(name: str, value):
        if not isinstance(value, PackedLinear):
            return _encode_float(value, gguf.GGMLQuantizationType.Q8_0)
        if value.bits != bits or value.group != 32 or not bool((value.zero == zero).all()) \
                or value.q.max() > top:
            raise UserError(f"GPTQ tensor {name} is not on the {weights} grid: export it as "
                            "f16 or another type")
        return pack_blocks(value, weights), gguf.GGMLQuantizationType[weights.upper()]

    return encode


def pack_blocks(linear: PackedLinear, weights: str) -> np.ndarray:
    """GGUF block bytes [rows, blocks·bytes] from integers and f16 scales. Packed here
    because gguf.quants only quantizes floats; these integers are already chosen.
      Q4_0: f16 d, 16 bytes: q[j] in the low, q[j+16] in the high nibble
      Q5_0: f16 d, 32-bit qh holding bit 4 of q[j] at bit j, then the low nibbles as Q4_0
      Q8_0: f16 d, 32 int8 (q − 128)"""
    rows, cols = linear.q.shape
    q = linear.q.to(torch.int64).numpy().reshape(rows, cols // 32, 32)
    d = linear.scale.numpy().astype(np.float16).reshape(rows, cols // 32, 1).view(np.uint8)
    if weights == "q8_0":
        return np.concatenate([d, (q - 128).astype(np.int8).view(np.uint8)], axis=2).reshape(rows, -1)
    low = q & 0xF
    qs = (low[..., :16] | (low[..., 16:] << 4)).astype(np.uint8)
    if weights == "q4_0":
        return np.concatenate([d, qs], axis=2).reshape(rows, -1)
    high = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
    qh = high.sum(axis=2, dtype=np.uint32).astype("<u4")[..., None].view(np.uint8)
    return np.concatenate([d, qh, qs], axis=2).reshape(rows, -1)


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
