"""The registry of quantization grids: the exact integer grids of the export formats, one class each.

A grid says how a block of `group` consecutive input weights of one output row becomes
integers q in [qmin, qmax] and back: w ≈ (q - zero)·scale with an integer zero point
(q4_1: w ≈ q·scale + min), scale (and min) rounded to float16 as the file stores them.
GPTQ rounds onto the grid of the format it will be written in, so the exporter stores
the solver's integers as they are: each class fits, quantizes, dequantizes and says how its
integers travel in a GPTQ checkpoint; GGUF grids also pack their blocks.

  Q4_0   GGUF Q4_0: blocks of 32, scale = signed absmax / -8, q in 0..15, w = d·(q-8)
  Q4_1   GGUF Q4_1: blocks of 32, scale = (max-min)/15 and min, w = d·q + m
  Q5_0   GGUF Q5_0: blocks of 32, scale = signed absmax / -16, q in 0..31, w = d·(q-16)
  Q8_0   GGUF Q8_0: blocks of 32, scale = absmax / 127, q in -127..127
  NBits  ONNX MatMulNBits (and the standard GPTQ checkpoint): 4 or 8 bits, blocks of
         16..256, with zero points (asymmetric, zero in the grid) or symmetric
         (zero point 2^(bits-1), scale = signed absmax / -2^(bits-1), as ORT does);
         with zero points it is also MLX's affine grid (bias = −zero·scale in float16),
         there at 2, 3, 4, 5, 6 or 8 bits (the wider-than-4 integers travel in a GPTQ
         checkpoint's 8-bit layout, as Q5_0's do)

Adding a grid: a class here with its `name` (registered by __init_subclass__).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from edgellm.errors import UserError

GRIDS: dict[str, type[Grid]] = {}  # name → class, filled as the classes are defined
NBITS_BITS = (4, 8)
AFFINE_BITS = (2, 3, 4, 5, 6, 8)  # NBits widths with zero points GPTQ solves onto (MLX's affine)
NBITS_GROUPS = (16, 32, 64, 128, 256)
SHRINKS = tuple(1 - 0.03 * k for k in range(11))  # range factors Grid.fit tries per block
# MLX's affine groups (w = q·scale + bias, float16 scale and bias): an NBits grid with zero
# points, the bias written as −zero·scale (export/mlx_gptq.py); mlx-lm's default group
MLX_BITS = {"q4": 4, "q8": 8}
MLX_GROUP = 64


@dataclass(frozen=True)
class Grid:
    bits: int
    group: int
    symmetric: bool

    name: ClassVar[str]
    offset: ClassVar[int] = 0  # added to q for the unsigned integers of a GPTQ checkpoint
    aliases: ClassVar[tuple[str, ...]] = ()  # labels of other grids that are this very grid
    gptq: ClassVar[bool] = True  # its integers fit a GPTQ checkpoint
    gptqmodel: ClassVar[bool] = False  # GPTQModel solves onto it (integer zero point per group)
    # AutoRound computes it exactly (compress/autoround.py): an integer zero point per group,
    # or symmetric with the signed extreme at -2^(bits-1) and integers down to it
    autoround: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete grid, not a family of them
            GRIDS[cls.name] = cls

    @property
    def qmin(self) -> int:
        return 0

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def label(self) -> str:
        return self.name

    @property
    def storage_bits(self) -> int:
        """Bits per integer in a GPTQ checkpoint: 4, or 8 for wider grids (q5_0's 0..31
        travel in the 8-bit layout with zero point 16, a valid 8-bit checkpoint)."""
        return 4 if self.bits == 4 else 8

    def fit(self, w: torch.Tensor, importance: torch.Tensor | None = None,
            shrinks: tuple[float, ...] = (1.0,)) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) per row for a [rows, group] block. With several `shrinks`, the range
        is narrowed by each factor in turn (clipping outliers) and each row keeps the one
        with the least rounding error, weighted per column by `importance` (the Hessian
        diagonal: how much each input matters; [group], or [rows, group] for rows from
        different blocks). The format stores any scale, so this is still exactly its grid."""
        best = None
        for shrink in shrinks:
            scale, zero = self.fit_range(w.float() * shrink)
            error = (self.value(self.quantize(w, scale, zero), scale[:, None], zero[:, None]) - w) ** 2
            if importance is not None:
                error = error * (importance if importance.dim() == 2 else importance[None, :])
            error = error.sum(dim=1)
            if best is None:
                best = (error, scale, zero)
            else:
                better = error < best[0]
                best = (torch.where(better, error, best[0]), torch.where(better, scale, best[1]),
                        torch.where(better, zero, best[2]))
        return best[1], best[2]

    def fit_blocks(self, weight: torch.Tensor, importance: torch.Tensor | None = None,
                   shrinks: tuple[float, ...] = (1.0,),
                   chunk_elems: int = 1 << 22) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) [rows, cols/group] of every block of a [rows, cols] matrix, each
        fitted as `fit` fits one, all blocks of a chunk of rows in one call (a call per
        block was most of GPTQ's fixed cost on small matrices)."""
        rows, cols = weight.shape
        blocks = cols // self.group
        scale, zero = torch.empty(rows, blocks), torch.empty(rows, blocks)
        step = max(1, chunk_elems // cols)
        for r1 in range(0, rows, step):
            chunk = weight[r1:r1 + step].reshape(-1, self.group)
            per_block = None if importance is None else \
                importance.reshape(blocks, self.group).repeat(len(chunk) // blocks, 1)
            fitted = self.fit(chunk, per_block, shrinks)
            scale[r1:r1 + step], zero[r1:r1 + step] = (t.reshape(-1, blocks) for t in fitted)
        return scale, zero

    def fit_range(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) covering a [rows, group] block's full range: scale f16-representable,
        zero the integer zero point."""
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integers q (as float) nearest to w on the grid; w [rows] or [rows, k]."""
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return (torch.round(w / _nonzero(scale)) + zero).clamp(self.qmin, self.qmax)

    def value(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The weight the runtime computes from q: ggml and MatMulNBits both evaluate
        (q - zero)·scale in float32, so this is bit-exact."""
        return (q - zero) * scale

    def stored(self, values: torch.Tensor) -> torch.Tensor:
        """q or zero points as the unsigned integers of a GPTQ checkpoint."""
        return values + self.offset

    def takes_checkpoint(self, bits: int, group: int, symmetric: bool) -> bool:
        """Whether a GPTQ checkpoint edgellm did not solve (no recorded grid) is on this grid
        by its settings alone: symmetric, the same group, integers as wide as the grid's."""
        return (self.gptq and symmetric and group == self.group
                and bits == self.storage_bits == self.bits)


@dataclass(frozen=True)
class GgufGrid(Grid):
    """A GGUF block type: blocks of 32 with one f16 scale each, named as ggml names it."""

    bits: int = 4
    group: int = 32
    symmetric: bool = True

    @property
    def ggml_type(self) -> str:
        """The gguf.GGMLQuantizationType member."""
        return self.name.upper()

    @property
    def file_type(self) -> str:
        """The gguf.LlamaFileType member of a file mostly in this type."""
        return f"MOSTLY_{self.name.upper()}"

    def fit_range(self, w):
        return _symmetric_range(self.bits, w)

    def holds(self, linear) -> bool:
        """Whether a checkpoint's PackedLinear (unsigned q and zero points) lies on this grid:
        symmetric, so every zero point is the grid's middle."""
        middle = (1 << (self.bits - 1)) + self.offset
        return (linear.bits == self.storage_bits and linear.group == self.group
                and bool((linear.zero == middle).all()) and int(linear.q.max()) <= self.qmax + self.offset)

    def pack(self, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """GGUF block bytes [rows, blocks·bytes] from a checkpoint's unsigned integers q
        [rows, cols] and scales [rows, blocks] (packed here because gguf.quants only
        quantizes floats; these integers are already chosen)."""
        rows, cols = q.shape
        q = q.astype(np.int64).reshape(rows, cols // 32, 32) - self.offset
        d = scale.astype(np.float16).reshape(rows, cols // 32, 1).view(np.uint8)
        return np.concatenate([d, *self.block_payload(q)], axis=2).reshape(rows, -1)

    def block_payload(self, q: np.ndarray) -> list[np.ndarray]:
        """The bytes after each block's scale, from its integers q [rows, blocks, 32]."""
        raise NotImplementedError


def _nibbles(q: np.ndarray) -> np.ndarray:
    """16 bytes per block: q[j] in the low, q[j+16] in the high nibble (Q4_0, Q5_0)."""
    low = q & 0xF
    return (low[..., :16] | (low[..., 16:] << 4)).astype(np.uint8)


@dataclass(frozen=True)
class Q4_0(GgufGrid):
    name: ClassVar[str] = "q4_0"
    aliases: ClassVar[tuple[str, ...]] = ("nbits4-g32-sym",)  # MatMulNBits int4, symmetric, 32
    gptqmodel: ClassVar[bool] = True
    autoround: ClassVar[bool] = True

    def block_payload(self, q):
        return [_nibbles(q)]


@dataclass(frozen=True)
class Q4_1(GgufGrid):
    symmetric: bool = False
    name: ClassVar[str] = "q4_1"
    gptq: ClassVar[bool] = False  # its float minimum does not fit a GPTQ checkpoint

    def fit_range(self, w):
        """scale = (max-min)/15, zero = the f16 block minimum."""
        low, high = w.min(dim=1).values, w.max(dim=1).values
        return _f16((high - low) / self.qmax), _f16(low)

    def quantize(self, w, scale, zero):
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return torch.round((w - zero) / _nonzero(scale)).clamp(self.qmin, self.qmax)

    def value(self, q, scale, zero):
        """ggml evaluates q·scale + min in float32."""
        return q * scale + zero


@dataclass(frozen=True)
class Q5_0(GgufGrid):
    bits: int = 5
    name: ClassVar[str] = "q5_0"
    autoround: ClassVar[bool] = True

    def block_payload(self, q):
        """A 32-bit qh holding bit 4 of q[j] at bit j, then the low nibbles as Q4_0."""
        high = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        qh = high.sum(axis=2, dtype=np.uint32).astype("<u4")[..., None].view(np.uint8)
        return [qh, _nibbles(q)]


@dataclass(frozen=True)
class Q8_0(GgufGrid):
    bits: int = 8
    name: ClassVar[str] = "q8_0"
    offset: ClassVar[int] = 128  # checkpoints store −127..127 (and zero point 0) as 1..255

    @property
    def qmin(self) -> int:
        return -127

    @property
    def qmax(self) -> int:
        return 127

    def fit_range(self, w):
        return _f16(w.abs().max(dim=1).values / 127), torch.zeros(len(w))

    def holds(self, linear) -> bool:
        """Q8_0 stores int8: any 8-bit symmetric checkpoint (zero point 128) fits."""
        return (linear.bits == 8 and linear.group == 32 and bool((linear.zero == 128).all()))

    def block_payload(self, q):
        return [q.astype(np.int8).view(np.uint8)]


@dataclass(frozen=True)
class NBits(Grid):
    """MatMulNBits / the standard GPTQ checkpoint grid."""

    name: ClassVar[str] = "nbits"
    gptqmodel: ClassVar[bool] = True
    autoround: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return f"nbits{self.bits}-g{self.group}-{'sym' if self.symmetric else 'asym'}"

    def fit_range(self, w):
        if self.symmetric:  # as GGUF's symmetric blocks (ONNX Runtime's own symmetric rounding)
            return _symmetric_range(self.bits, w)
        low = w.min(dim=1).values.clamp(max=0)
        high = w.max(dim=1).values.clamp(min=0)
        scale = _f16((high - low) / self.qmax)
        return scale, torch.round(-low / _nonzero(scale)).clamp(0, self.qmax)


GGUF_GRIDS = {name: cls for name, cls in GRIDS.items() if issubclass(cls, GgufGrid)}


def _symmetric_range(bits: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed extreme maps to -half: scale = extreme / -half, zero point half."""
    half = 1 << (bits - 1)
    extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True))[:, 0]
    return _f16(extreme / -half), torch.full((len(w),), float(half))


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """A block of zeros has scale 0: divide by 1 instead (every q is then the zero point)."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def dequantize(grid: Grid, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[rows, cols] weights from integers q [rows, cols] and per-block scale/zero
    [rows, cols/group], exactly as the runtime computes them."""
    scale = scale.float().repeat_interleave(grid.group, dim=1)
    zero = zero.float().repeat_interleave(grid.group, dim=1)
    return grid.value(q.float(), scale, zero)


def fit_matrix(grid: Grid, weight: torch.Tensor, importance: torch.Tensor,
               shrinks: tuple[float, ...] = SHRINKS) -> tuple[torch.Tensor, ...]:
    """Round-to-nearest of a whole [rows, cols] matrix onto `grid`, each block's range
    narrowed as the `importance`-weighted rounding error prefers (the search GPTQ's static
    scales use): (q [rows, cols], scale and zero [rows, cols/group])."""
    scale, zero = grid.fit_blocks(weight.float(), importance, shrinks)
    return nearest(grid, weight, scale, zero), scale, zero


def nearest(grid: Grid, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest integers of a [rows, cols] matrix on `grid` with per-block scale and
    zero [rows, cols/group]."""
    blocks = weight.reshape(len(weight), -1, grid.group)
    return grid.quantize(blocks, scale[..., None], zero[..., None]).reshape(weight.shape)


def grid_named(label: str) -> Grid | None:
    """The grid a plan or checkpoint names: a GGUF type (`q4_0`, `Q4_0`) or an NBits label
    (`nbits4-g32-asym`); None for a type no grid here describes (k-quants)."""
    cls = GRIDS.get(label.lower())
    if cls is not None and cls is not NBits:
        return cls()
    match = re.fullmatch(r"nbits(\d+)-g(\d+)-(sym|asym)", label)
    widths = NBITS_BITS if match and match[3] == "sym" else AFFINE_BITS
    if match and int(match[1]) in widths and int(match[2]) in NBITS_GROUPS:
        return NBits(int(match[1]), int(match[2]), match[3] == "sym")
    return None


def canonical(grid: Grid) -> Grid:
    """The registered grid that `grid` is under another name (NBits 4-bit symmetric blocks
    of 32 are Q4_0), so both share one GPTQ run; else `grid`."""
    for cls in GRIDS.values():
        if grid.label in cls.aliases:
            return cls()
    return grid


def same_grid(label: str, grid: Grid) -> bool:
    """Whether a recorded grid label (a checkpoint's `edgellm_grid`) names `grid`."""
    return label == grid.label or label in grid.aliases


def gguf_grid(name: str) -> GgufGrid:
    return GGUF_GRIDS[name]()


def grid_for_export(export, bits: int | None, group_size: int | None,
                    method: str = "GPTQ") -> Grid:
    """The grid of a recipe export target (gguf q4_0/q5_0/q8_0, onnx/ort int4/int8), checked
    against the step's own bits/group_size when it gives them (`method` names the step in
    the messages)."""
    if export.format == "gguf":
        if export.weights not in GGUF_GRIDS:
            raise UserError(f"{method} writes GGUF {', '.join(GGUF_GRIDS)} blocks, not "
                            f"'{export.weights}': choose one of those weights")
        grid = gguf_grid(export.weights)
    elif export.format in ("onnx", "ort"):
        if export.weights not in ("int4", "int8"):
            raise UserError(f"{method} writes ONNX int4/int8 (MatMulNBits), not '{export.weights}'")
        grid = canonical(NBits(int(export.weights[3:]), export.block_size, export.symmetric))
    elif export.format == "mlx":
        if export.weights not in MLX_BITS:
            raise UserError(f"{method} writes MLX q4/q8 (affine groups of {MLX_GROUP}), not "
                            f"'{export.weights}'")
        grid = NBits(MLX_BITS[export.weights], MLX_GROUP, False)
    else:
        raise UserError(f"{method} cannot feed a {export.format} export: use gguf, onnx, ort or mlx")
    if bits is not None and bits != grid.bits:
        raise UserError(f"{method} bits={bits} but the export {export.format} {export.weights} "
                        f"stores {grid.bits}-bit weights: make them agree")
    if group_size is not None and group_size != grid.group:
        raise UserError(f"{method} group_size={group_size} but the export {export.format} "
                        f"{export.weights} uses blocks of {grid.group}: make them agree")
    return grid


def standalone_grid(name: str | None, bits: int, group_size: int, symmetric: bool) -> Grid:
    """The grid for a GPTQ run outside a recipe: a named GGUF grid, or MatMulNBits/GPTQ."""
    if name in GGUF_GRIDS:
        return gguf_grid(name)
    if bits not in NBITS_BITS:
        raise UserError(f"GPTQ bits={bits} is not in the grid registry: use 4 or 8 "
                        "(5 with grid=\"q5_0\")")
    if group_size not in NBITS_GROUPS:
        raise UserError(f"GPTQ group_size={group_size} is not in the grid registry: use one of "
                        f"{', '.join(map(str, NBITS_GROUPS))}")
    return NBits(bits, group_size, symmetric)
