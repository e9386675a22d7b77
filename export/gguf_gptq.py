"""GPTQ checkpoints into GGUF blocks as they are: the solved integers and scales, no second rounding.

llama.cpp's converter writes the dequantized weights as f32 (so its tensor names, row
transforms such as Llama's q/k permutation, and metadata are the ones llama.cpp expects);
each of its 2-D tensors is then matched row by row to the checkpoint's dequantized rows
(exact in f32: integer × f16 scale), and those rows' blocks are packed from the integers
by their grid (edgellm/grids.py).
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
from edgellm.gguf_bounds import GGUFMeta, read_gguf_meta, tensor_array
from edgellm.gptq_checkpoint import PackedLinear, gptq_config, read_packed
from edgellm.grids import GGUF_GRIDS, GgufGrid, same_grid


def gguf_blocks_fit(folder: Path, weights: str) -> bool:
    """Whether a folder is a GPTQ checkpoint solved on `weights`' grid (edgellm records
    it; for other checkpoints: symmetric integers as wide as the grid's, blocks of 32)."""
    config_path = Path(folder) / "config.json"
    quant = gptq_config(json.loads(config_path.read_text())) if config_path.is_file() else None
    grid = GGUF_GRIDS[weights]() if weights in GGUF_GRIDS else None
    if quant is None or grid is None or not grid.gptq:
        return False
    if "edgellm_grid" in quant:
        return same_grid(quant["edgellm_grid"], grid)
    return grid.takes_checkpoint(int(quant["bits"]), int(quant["group_size"]), bool(quant.get("sym")))


def write_gptq_gguf(folder: Path, out_path: Path, weights: str, work: Path) -> None:
    from edgellm.export.gguf_float import f32_intermediate

    source = f32_intermediate(folder, work)
    grid = GGUF_GRIDS[weights]()
    linears = packed_linears(folder)
    rows = RowIndex(linears, dict.fromkeys(linears, grid))
    meta, data = read_gguf_meta(source), np.memmap(source, dtype=np.uint8, mode="r")
    write_like(meta, out_path, ((name, *encode_tensor(tensor_array(data, span), rows, grid))
                                for name, span in meta.spans.items()),
               file_type=gguf.LlamaFileType[grid.file_type])
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
    """Each dequantized row of every GPTQ linear, by the hash of its f32 bytes → its blocks,
    packed by that linear's grid (linears without one in `grids` are left out)."""

    def __init__(self, linears: dict[str, PackedLinear], grids: dict[str, GgufGrid]):
        self.by_hash: dict[bytes, tuple[str, int]] = {}
        self.blocks: dict[str, np.ndarray] = {}
        self.types = {name: grid.ggml_type for name, grid in grids.items()}
        self.unused = set(grids)
        for name, grid in grids.items():
            linear = linears[name]
            if not grid.holds(linear):
                raise UserError(f"GPTQ tensor {name} is not on the {grid.label} grid: export it "
                                "as f16 or another type")
            self.blocks[name] = grid.pack(linear.q.to(torch.int64).numpy(), linear.scale.numpy())
            for index, row in enumerate(linear.dequantize().numpy().astype(np.float32)):
                self.by_hash.setdefault(row_hash(row), (name, index))

    def rows_of(self, matrix: np.ndarray) -> tuple[np.ndarray, str] | None:
        """(the packed block rows of `matrix`'s rows, their ggml type), or None when any row
        is not GPTQ's or its rows come from linears of different types."""
        found = [self.by_hash.get(row_hash(row)) for row in matrix]
        if not found or any(f is None for f in found):
            return None
        kinds = {self.types[name] for name, _ in found}
        if len(kinds) != 1:
            return None
        for name, _ in found:
            self.unused.discard(name)
        return np.stack([self.blocks[name][index] for name, index in found]), kinds.pop()


def row_hash(row: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=16).digest()


def encode_tensor(values: np.ndarray, rows: RowIndex, grid: GgufGrid):
    """(data, raw GGML type or None) for one tensor of the f32 GGUF."""
    data = np.asarray(values, dtype=np.float32)
    if data.ndim != 2:
        return data, None
    found = rows.rows_of(data)
    if found is not None:
        return found[0], gguf.GGMLQuantizationType[grid.ggml_type]
    if data.shape[1] % 32:
        return data.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(data, kind), kind


def carry_gptq_blocks(folder: Path, path: Path, f32_gguf: Path) -> int:
    """Rewrite the GGUF llama.cpp wrote at `path` (from `f32_gguf`, the checkpoint's
    dequantized weights) with every matrix GPTQ solved onto the type the file gives it
    stored as the checkpoint's own blocks; the rest as llama.cpp wrote it. Returns how many
    matrices were carried."""
    linears = packed_linears(folder)
    rows = RowIndex(linears, checkpoint_grids(folder, linears))
    written, written_data = read_gguf_meta(path), np.memmap(path, dtype=np.uint8, mode="r")
    source, source_data = read_gguf_meta(f32_gguf), np.memmap(f32_gguf, dtype=np.uint8, mode="r")
    carried = {}
    for name, span in source.spans.items():
        if len(span.shape) == 2:
            found = rows.rows_of(np.asarray(tensor_array(source_data, span), dtype=np.float32))
            if found is not None and name in written.spans and \
                    found[1] == written.spans[name].kind.name:
                carried[name] = found[0]
    tensors = ((name, carried.get(name, tensor_array(written_data, span)), span.kind)
               for name, span in written.spans.items())
    write_like(written, path, ((name, data, kind if data.dtype == np.uint8 else None)
                               for name, data, kind in tensors))
    return len(carried)


def checkpoint_grids(folder: Path, linears: dict[str, PackedLinear]) -> dict[str, GgufGrid]:
    """The GGUF grid of each GPTQ linear that has one: recorded per linear (a checkpoint
    solved under a size budget), for the whole checkpoint, or read from its settings."""
    quant = gptq_config(json.loads((Path(folder) / "config.json").read_text()))
    if "edgellm_grids" in quant:
        labels = quant["edgellm_grids"]
        return {n: GGUF_GRIDS[labels[n]]() for n in linears if labels.get(n) in GGUF_GRIDS}
    fitting = [name for name in GGUF_GRIDS if gguf_blocks_fit(folder, name)]
    return dict.fromkeys(linears, GGUF_GRIDS[fitting[0]]()) if fitting else {}


def write_like(meta: GGUFMeta, out_path: Path, tensors, file_type=None) -> None:
    """Write `out_path` atomically with the metadata of a GGUF read by edgellm's walk (its
    file type replaced when one is given) and `tensors`, (name, data, raw GGML type or None)
    in file order."""
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, str(meta.fields["general.architecture"][2]))
        copy_fields(meta, writer, file_type)
        for name, data, raw in tensors:
            writer.add_tensor(name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def copy_fields(meta: GGUFMeta, writer: gguf.GGUFWriter, file_type=None) -> None:
    """Every metadata field of a GGUF, its file type replaced when one is given."""
    for key, (kind, item, value) in meta.fields.items():
        if key == "general.architecture":
            continue
        if key == "general.file_type" and file_type is not None:
            writer.add_file_type(file_type)
            continue
        writer.add_key_value(key, value, gguf.GGUFValueType(kind),
                             None if item is None else gguf.GGUFValueType(item))
