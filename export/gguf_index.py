"""Where each tensor of a GGUF file lies (ggml type, shape, bytes), read by ggml's own C
parser in the llama-cpp-python build the exports already use.

gguf-py's GGUFReader parses every metadata array element by element in Python: about 2 s
a file for SmolLM2's 49,152-token vocabulary and merges, which the sensitivity table paid
once per candidate type and once for the f32 file. ggml's `gguf_init_from_file` (no tensor data allocated) reads the
same header in milliseconds. llama-cpp-python binds llama.h but not gguf.h, so the calls
used here are declared here, from gguf.h at the runtime's commit.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

GGML_MAX_DIMS = 4


class _InitParams(ctypes.Structure):
    """gguf.h `struct gguf_init_params`: no tensor context is made (ctx NULL)."""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@dataclass(frozen=True)
class TensorSpan:
    """One tensor of a GGUF: its type, its shape as numpy orders it, where its bytes are."""

    kind: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


@functools.cache
def _ggml():
    import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    ctx, index = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "gguf_init_from_file": ([ctypes.c_char_p, _InitParams], ctx),
        "gguf_free": ([ctx], None),
        "gguf_get_data_offset": ([ctx], ctypes.c_size_t),
        "gguf_get_n_tensors": ([ctx], ctypes.c_int64),
        "gguf_get_tensor_name": ([ctx, index], ctypes.c_char_p),
        "gguf_get_tensor_type": ([ctx, index], ctypes.c_int),
        "gguf_get_tensor_offset": ([ctx, index], ctypes.c_size_t),
        "gguf_get_tensor_size": ([ctx, index], ctypes.c_size_t),
        "gguf_get_tensor_ne": ([ctx, index], ctypes.POINTER(ctypes.c_int64)),
    }
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


def tensor_index(path: Path) -> dict[str, TensorSpan]:
    """{tensor name: its span}, in the file's order."""
    lib = _ggml()
    handle = lib.gguf_init_from_file(os.fsencode(path), _InitParams(True, None))
    if not handle:
        raise ValueError(f"{path}: not a GGUF file ggml can read")
    try:
        base = lib.gguf_get_data_offset(handle)
        spans = {}
        for i in range(lib.gguf_get_n_tensors(handle)):
            dims = lib.gguf_get_tensor_ne(handle, i)[:GGML_MAX_DIMS]
            while len(dims) > 1 and dims[-1] == 1:  # ggml pads unused dimensions with 1
                dims.pop()
            spans[lib.gguf_get_tensor_name(handle, i).decode()] = TensorSpan(
                gguf.GGMLQuantizationType(lib.gguf_get_tensor_type(handle, i)),
                tuple(reversed(dims)), base + lib.gguf_get_tensor_offset(handle, i),
                lib.gguf_get_tensor_size(handle, i))
        return spans
    finally:
        lib.gguf_free(handle)


def read_rows(data: np.ndarray, span: TensorSpan) -> np.ndarray:
    """The tensor's bytes from the file's memory map `data` (uint8), one row per row of the
    tensor: what gguf.quants.dequantize takes for any type."""
    rows = int(np.prod(span.shape[:-1], dtype=np.int64))
    return data[span.offset:span.offset + span.nbytes].reshape(rows, -1)
