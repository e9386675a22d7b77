"""GPTQ checkpoints into GGUF blocks as they are: the solved integers and scales, no second rounding.

llama.cpp's converter writes the dequantized weights as f32 (so its tensor names, row
transforms such as Llama's q/k permutation, and metadata are the ones llama.cpp expects);
each of its 2-D tensors is then matched row by row to the checkpoint's dequantized rows
(exact in f32: integer × f16 scale), and those rows' blocks are packed from the integers.
Matching by content works whatever row order, split or fusion a family's converter applies.
Every other matrix goes in Q8_0 (what llama.cpp gives the tied embedding when the width is
not a multiple of 256) and vectors in f32.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from edgellm.artifacts import atomic_path
from edgellm.errors import UserError
from edgellm.gptq_checkpoint import PackedLinear, gptq_config, read_packed

# weights → (file type, checkpoint bits, zero point, largest integer)
GPTQ_BLOCKS = {
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, 4, 8, 15),
    "q5_0": (gguf.LlamaFileType.MOSTLY_Q5_0, 8, 16, 31),  # 8-bit checkpoint layout
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, 8, 128, 255),
}
GRID_ALIASES = {"q4_0": "nbits4-g32-sym"}  # the same grid under its MatMulNBits name


def gguf_blocks_fit(folder: Path, weights: str) -> bool:
    """Whether a folder is a GPTQ checkpoint solved on `weights`' grid (edgellm records
    it; for other checkpoints: 4-bit symmetric blocks of 32 are Q4_0's grid, 8-bit Q8_0's)."""
    config_path = Path(folder) / "config.json"
    quant = gptq_config(json.loads(config_path.read_text())) if config_path.is_file() else None
    if quant is None or weights not in GPTQ_BLOCKS:
        return False
    if "edgellm_grid" in quant:
        return quant["edgellm_grid"] in (weights, GRID_ALIASES.get(weights))
    _, bits, _, _ = GPTQ_BLOCKS[weights]
    return (weights != "q5_0" and int(quant["bits"]) == bits and int(quant["group_size"]) == 32
            and bool(quant.get("sym")))


def write_gptq_gguf(folder: Path, out_path: Path, weights: str, work: Path) -> None:
    from edgellm.export.gguf_float import write_float_gguf

    source = work / "model-f32.gguf"
    if not source.is_file():
        write_float_gguf(folder, source, "f32", work)
    rows = RowIndex(packed_linears(folder), weights)
    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        copy_fields(reader, writer, file_type=GPTQ_BLOCKS[weights][0])
        for tensor in reader.tensors:
            data, raw = encode_tensor(tensor, rows, weights)
            writer.add_tensor(tensor.name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    if rows.unused:
        raise UserError(f"GPTQ linears {', '.join(sorted(rows.unused)[:3])} of {folder} were not "
                        "found in the converted GGUF: export it as f16 or another type")


def packed_linears(folder: Path) -> dict[str, PackedLinear]:
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    if not gptq_config(json.loads((Path(folder) / "config.json").read_text())):
        return {}
    return read_packed(folder, tensors)


class RowIndex:
    """Each dequantized row of every GPTQ linear, by the hash of its f32 bytes → its blocks."""

    def __init__(self, linears: dict[str, PackedLinear], weights: str):
        self.by_hash: dict[bytes, tuple[str, int]] = {}
        self.blocks: dict[str, np.ndarray] = {}
        self.unused = set(linears)
        for name, linear in linears.items():
            check_grid(name, linear, weights)
            self.blocks[name] = pack_blocks(linear, weights)
            for index, row in enumerate(linear.dequantize().numpy().astype(np.float32)):
                self.by_hash.setdefault(row_hash(row), (name, index))

    def rows_of(self, matrix: np.ndarray) -> np.ndarray | None:
        """The packed block rows of `matrix`'s rows, or None when any row is not GPTQ's."""
        found = [self.by_hash.get(row_hash(row)) for row in matrix]
        if not found or any(f is None for f in found):
            return None
        for name, _ in found:
            self.unused.discard(name)
        return np.stack([self.blocks[name][index] for name, index in found])


def row_hash(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


def check_grid(name: str, linear: PackedLinear, weights: str) -> None:
    _, bits, zero, top = GPTQ_BLOCKS[weights]
    if linear.bits != bits or linear.group != 32 or not bool((linear.zero == zero).all()) \
            or linear.q.max() > top:
        raise UserError(f"GPTQ tensor {name} is not on the {weights} grid: export it as "
                        "f16 or another type")


def encode_tensor(tensor, rows: RowIndex, weights: str):
    """(data, raw GGML type or None) for one tensor of the f32 GGUF."""
    data = np.asarray(tensor.data, dtype=np.float32)
    if data.ndim != 2:
        return data, None
    packed = rows.rows_of(data)
    if packed is not None:
        return packed, gguf.GGMLQuantizationType[weights.upper()]
    if data.shape[1] % 32:
        return data.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, kind), kind


def copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, file_type) -> None:
    """Every metadata field of the f32 GGUF, its file type replaced."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key == "general.file_type":
            writer.add_file_type(file_type)
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub)


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
