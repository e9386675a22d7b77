"""HF folder → GGUF file: float types written by llama.cpp's own converter (export/llama_converter.py),
quantized types made from its f32 GGUF by llama.cpp's quantizer (`llama_model_quantize`), and
GPTQ checkpoints carried block for block (export/gguf_gptq.py).

The same file loads in llama.cpp unchanged: it is what laptop and phone apps embed.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from edgellm.archs import check_rope
from edgellm.artifacts import atomic_path
from edgellm.errors import UserError
from edgellm.export.gguf_float import f32_intermediate, write_float_gguf

FLOAT_TYPES = ("f32", "f16", "bf16")
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
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
GGUF_WEIGHTS = FLOAT_TYPES + tuple(QUANT_TYPES)
# per-tensor types a size budget may choose (export/gguf_budget.py) → the file type whose
# `pure` mode writes every matrix in that type
BUDGET_TYPES = {"q3_k": "q3_k_m", "q4_0": "q4_0", "q4_1": "q4_1", "q4_k": "q4_k_m",
                "q5_0": "q5_0", "q5_1": "q5_1", "q5_k": "q5_k_m", "q6_k": "q6_k", "q8_0": "q8_0"}


def check_exportable(folder: Path) -> None:
    """Before any work: the folder's architecture and rope scaling have a GGUF route."""
    check_rope(json.loads((Path(folder) / "config.json").read_text()), str(folder))


def export_gguf(folder: Path, out_path: Path, weights: str, work_dir: Path,
                imatrix: dict | None = None) -> Path:
    """Write `out_path` in the requested weight type; `work_dir` keeps the f32 intermediate.
    `imatrix` ({tensor name: mean squared input per column}) guides quantized types.
    A GPTQ checkpoint whose grid is the requested type's is written block for block."""
    from edgellm.export.gguf_gptq import gguf_blocks_fit, write_gptq_gguf

    if weights not in GGUF_WEIGHTS:
        raise UserError(f"GGUF weights '{weights}' unknown: use one of {', '.join(GGUF_WEIGHTS)}")
    check_exportable(folder)
    if weights in FLOAT_TYPES:
        write_float_gguf(folder, out_path, weights, work_dir)
    elif gguf_blocks_fit(folder, weights):
        write_gptq_gguf(folder, out_path, weights, work_dir)
    else:
        quantize_gguf(f32_intermediate(folder, work_dir), out_path, weights, imatrix=imatrix)
    check_loads(out_path, work_dir / f"load-{out_path.stem}.log")
    return out_path


def check_loads(path: Path, log: Path) -> None:
    """llama.cpp opens the file (metadata, vocabulary, every tensor's type, shape and
    offset; memory-mapped, so it costs well under a second) before it is published."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    with native_stderr_to(log):
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        path.unlink(missing_ok=True)
        raise UserError(f"llama.cpp cannot load the GGUF edgellm wrote from this model ({log} "
                        "says why); nothing was published: please report it with that log")
    llama_cpp.llama_model_free(model)


def quantize_gguf(source: Path, out_path: Path, weights: str, threads: int = 0,
                  imatrix: dict | None = None, pure: bool = False,
                  tensor_types: dict[str, str] | None = None) -> None:
    """Quantize with llama.cpp's quantizer, exactly as `llama-quantize` would: `pure` is its
    --pure (every matrix in the one type), `tensor_types` {tensor name: ggml type name} its
    --tensor-type overrides."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[weights])
    params.nthread = threads
    params.pure = pure
    if imatrix:
        from edgellm.export.imatrix import imatrix_param

        array, _buffers = imatrix_param(imatrix)  # _buffers keeps the data alive until return
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if tensor_types:
        overrides, _patterns = tensor_type_overrides(tensor_types)  # alive until return
        params.tt_overrides = ctypes.cast(overrides,
                                          ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    suffix = ("-imatrix" if imatrix else "") + ("-pure" if pure else "") + \
        ("-per-tensor" if tensor_types else "")
    log = source.parent / f"quantize-{weights}{suffix}.log"
    with atomic_path(out_path) as tmp, native_stderr_to(log):
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if status != 0:
            raise UserError(f"llama.cpp could not quantize {source} to {weights} (status {status})")


def tensor_type_overrides(tensor_types: dict[str, str]):
    """A NULL-terminated llama_model_tensor_override array, one exact-name pattern per
    tensor (llama.cpp matches them with std::regex_search), and the strings it points to."""
    import re

    import gguf
    import llama_cpp

    array = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
    patterns = []
    for i, (name, kind) in enumerate(sorted(tensor_types.items())):
        pattern = f"^{re.escape(name)}$".encode()
        patterns.append(pattern)
        array[i].pattern = pattern
        array[i].type = int(gguf.GGMLQuantizationType[kind])
    array[len(tensor_types)].pattern = None
    return array, patterns


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
