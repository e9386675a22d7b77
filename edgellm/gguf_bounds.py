"""Bounds check of a GGUF file's header, metadata and tensor table before any reader parses it.

gguf-py's GGUFReader trusts the counts and lengths it reads: a crafted file claiming an
array of 2^40 strings keeps it looping for hours (found by tests/test_fuzz.py), and
transformers' GGUF loader uses the same reader. No maintained library validates a GGUF
against its own size, so this walk is written here: it reads every length-prefixed field
of the metadata and tensor table, checking each against the bytes that remain, and stops
at the first one that cannot be true. It allocates nothing in proportion to a claimed size.

The same walk keeps what it reads (`read_gguf_meta`): every metadata value with its type,
and each tensor's element count, type, shape and place in the file. gguf-py's reader
builds a numpy view per array item, which takes 20 s on Gemma 3's 262,144-token vocabulary
against well under a second here, and edgellm reads a source's metadata several times per
run (family, BOS, vocabulary, size), the sensitivity table each candidate's matrices and
GPTQ's GGUF writer whole files (`tensor_array` gives each tensor as gguf-py's writer takes
it), so each file is walked once per process.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.errors import UserError

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
HEADER_BYTES = 24  # magic, version (u32), tensor count (u64), metadata key count (u64)
# smallest possible encodings: a tensor info (name length, 1 dim, type, offset) and a
# key/value pair (key length, value type, a one-byte value)
MIN_TENSOR_INFO_BYTES, MIN_KV_BYTES = 8 + 4 + 8 + 4 + 8, 8 + 4 + 1
# GGUF value types (gguf.GGUFValueType): fixed sizes of the scalar ones
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                  11: "q", 12: "d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 2


def check_gguf_header(path: Path, header: bytes) -> None:
    """Refuse a GGUF whose 24-byte header cannot be true: truncated, an unknown version,
    or tensor/key counts the file is too small to hold."""
    if len(header) < HEADER_BYTES:
        raise UserError(f"model file {path} is truncated (GGUF header incomplete): "
                        "download or export it again")
    version, tensors, kvs = struct.unpack("<IQQ", header[4:HEADER_BYTES])
    if version not in (2, 3):
        raise UserError(f"model file {path} has GGUF version {version}; edgellm reads versions "
                        "2 and 3: re-export it with a current llama.cpp or edgellm")
    size = path.stat().st_size
    if tensors * MIN_TENSOR_INFO_BYTES + kvs * MIN_KV_BYTES > size:
        raise UserError(f"model file {path} claims {tensors} tensors and {kvs} metadata keys, "
                        f"more than its {size} bytes can hold: the file is corrupt or crafted")


@dataclass(frozen=True)
class TensorSpan:
    """One tensor of a GGUF: its ggml type, its shape as numpy orders it, where its bytes
    are (from the start of the file) and how many."""

    kind: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class GGUFMeta:
    """What the walk read: {key: (value type, array item type or None, value)},
    {tensor name: element count} and {tensor name: its span}, in the file's order."""

    fields: dict[str, tuple[int, int | None, object]] = field(default_factory=dict)
    tensors: dict[str, int] = field(default_factory=dict)
    spans: dict[str, TensorSpan] = field(default_factory=dict)

    def values(self, prefix: str | tuple[str, ...] = "") -> dict:
        return {k: v for k, (_, _, v) in self.fields.items() if k.startswith(prefix)}

    @property
    def storage(self) -> dict[str, tuple[str, int]]:
        """{tensor name: (ggml type name, bytes)}."""
        return {name: (span.kind.name, span.nbytes) for name, span in self.spans.items()}


def check_gguf_layout(path: Path) -> None:
    """Walk the whole metadata and tensor table; refuse the file at the first field whose
    claimed length or count runs past the end of the file."""
    read_gguf_meta(path)


def read_gguf_meta(path: Path) -> GGUFMeta:
    """The checked metadata and tensor table of a GGUF file (walked once per file version)."""
    path = Path(path)
    stat = path.stat()
    return _walk_file(path.resolve(), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _walk_file(path: Path, size: int, mtime_ns: int) -> GGUFMeta:
    with open(path, "rb") as handle:
        header = handle.read(HEADER_BYTES)
        if header[:4] != GGUF_MAGIC:
            raise UserError(f"model file {path} is not a GGUF file (bad magic): pass a .gguf "
                            "file or an HF folder")
        check_gguf_header(path, header)
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _Walker(data, path).walk(*struct.unpack("<QQ", header[8:HEADER_BYTES]))


class _Walker:
    def __init__(self, data: mmap.mmap, path: Path):
        self.data, self.path, self.pos = data, path, HEADER_BYTES

    def corrupt(self, what: str) -> UserError:
        return UserError(f"model file {self.path} is corrupt or crafted ({what} at byte "
                         f"{self.pos} runs past its {len(self.data)} bytes): download or "
                         "export it again")

    def take(self, count: int, what: str) -> int:
        if count < 0 or self.pos + count > len(self.data):
            raise self.corrupt(what)
        start, self.pos = self.pos, self.pos + count
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.data, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.data, self.take(8, what))[0]

    def string(self, what: str) -> str:
        start = self.take(self.u64(f"{what} length"), what)
        raw = self.data[start:self.pos]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:  # kept, not fatal: llama.cpp reads such bytes as they are
            return raw.decode("utf-8", errors="replace")

    def value(self, kind: int, what: str, depth: int = 0) -> tuple[int | None, object]:
        """(array item type or None, value) of one metadata value."""
        if kind in SCALAR_BYTES:
            return None, struct.unpack_from("<" + SCALAR_FORMATS[kind], self.data,
                                            self.take(SCALAR_BYTES[kind], what))[0]
        if kind == STRING:
            return None, self.string(what)
        if kind == ARRAY and depth < MAX_ARRAY_NESTING:
            item, count = self.u32(f"{what} item type"), self.u64(f"{what} count")
            smallest = SCALAR_BYTES.get(item, 8)  # a string or array item is at least 8 bytes
            if count * smallest > len(self.data) - self.pos:
                raise self.corrupt(f"{what} of {count} items")
            if item in SCALAR_BYTES:
                start = self.take(count * smallest, what)
                fmt = f"<{count}{SCALAR_FORMATS[item]}"
                return item, list(struct.unpack_from(fmt, self.data, start))
            return item, [self.value(item, what, depth + 1)[1] for _ in range(count)]
        raise UserError(f"model file {self.path} is corrupt: {what} has unknown value "
                        f"type {kind}: download or export it again")

    def walk(self, tensors: int, kvs: int) -> GGUFMeta:
        meta, extents = GGUFMeta(), []
        for index in range(kvs):
            key = self.string(f"metadata key {index}")
            kind = self.u32(f"metadata value type {index}")
            meta.fields[key] = (kind, *self.value(kind, f"metadata value {index}"))
        for index in range(tensors):
            name = self.string(f"tensor {index} name")
            dims = self.u32(f"tensor {index} dimension count")
            if not 1 <= dims <= MAX_DIMS:
                raise UserError(f"model file {self.path} is corrupt: tensor {index} has {dims} "
                                f"dimensions: download or export it again")
            start = self.take(8 * dims + 4 + 8, f"tensor {index} shape, type and offset")
            shape = struct.unpack_from(f"<{dims}Q", self.data, start)
            kind, offset = struct.unpack_from("<IQ", self.data, start + 8 * dims)
            meta.tensors[name] = elements = prod(shape)
            extents.append((name, kind, shape[::-1], elements, offset))
        meta.spans = self.check_data(extents, meta.fields.get("general.alignment", (0, None, 32))[2])
        return meta

    def check_data(self, extents: list[tuple[str, int, tuple[int, ...], int, int]],
                   alignment) -> dict[str, TensorSpan]:
        """Each tensor's bytes (type's block size × elements, from its offset in the data
        section) must lie inside the file."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if not isinstance(alignment, int) or alignment <= 0:
            raise UserError(f"model file {self.path} is corrupt: general.alignment is "
                            f"{alignment!r}: download or export it again")
        data_start = -(-self.pos // alignment) * alignment
        spans = {}
        for name, kind, shape, elements, offset in extents:
            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise UserError(f"model file {self.path}: tensor {name} has ggml type {kind}, "
                                "which this gguf version does not know: update edgellm's gguf "
                                "package or re-export the file") from None
            end = data_start + offset + elements // block * size
            if elements % block or end > len(self.data):
                raise UserError(f"model file {self.path} is truncated or corrupt (tensor {name} "
                                f"ends at byte {end}, past its {len(self.data)} bytes): download "
                                "or export it again")
            spans[name] = TensorSpan(GGMLQuantizationType(kind), shape, data_start + offset,
                                     elements // block * size)
        return spans


# ggml types gguf-py keeps as numbers of their own dtype; every other type is block bytes
PLAIN_DTYPES = {"F32": "float32", "F16": "float16", "F64": "float64", "I8": "int8",
                "I16": "int16", "I32": "int32", "I64": "int64"}


def tensor_array(data, span: TensorSpan):
    """A tensor in the file's uint8 map `data` (np.memmap of the GGUF), as gguf-py's reader
    gives it and its writer takes it: a plain type as its numbers in the tensor's shape,
    a block type as its bytes, one row of bytes per row of the tensor."""
    raw = data[span.offset:span.offset + span.nbytes]
    if span.kind.name in PLAIN_DTYPES:
        return raw.view(PLAIN_DTYPES[span.kind.name]).reshape(span.shape)
    return raw.reshape(*span.shape[:-1], -1)
