"""The registry of quantization grids: the exact integer grids of the export formats.

A grid says how a block of `group` consecutive input weights of one output row becomes
integers q in [qmin, qmax] and back: w ≈ (q - zero)·scale with an integer zero point
(q4_1: w ≈ q·scale + min), scale (and min) rounded to float16 as the file stores them.
GPTQ rounds onto the grid of the format it will be written in, so the exporter stores
the solver's integers as they are.

  q4_0        GGUF Q4_0: blocks of 32, scale = signed absmax / -8, q in 0..15, w = d·(q-8)
  q4_1        GGUF Q4_1: blocks of 32, scale = (max-min)/15 and min, w = d·q + m
  q5_0        GGUF Q5_0: blocks of 32, scale = signed absmax / -16, q in 0..31, w = d·(q-16)
  q8_0        GGUF Q8_0: blocks of 32, scale = absmax / 127, q in -127..127
  nbits       ONNX MatMulNBits (and the standard GPTQ checkpoint): 4 or 8 bits, blocks of
              16..256, with zero points (asymmetric, zero in the grid) or symmetric
              (zero point 2^(bits-1), scale = signed absmax / -2^(bits-1), as ORT does)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgellm.errors import UserError

GGUF_GRIDS = {"q4_0": (4, True), "q4_1": (4, False), "q5_0": (5, True), "q8_0": (8, True)}
NBITS_BITS = (4, 8)
NBITS_GROUPS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Grid:
    name: str  # q4_0, q4_1, q5_0, q8_0, nbits
    bits: int
    group: int
    symmetric: bool

    @property
    def qmin(self) -> int:
        return -127 if self.name == "q8_0" else 0

    @property
    def qmax(self) -> int:
        return 127 if self.name == "q8_0" else (1 << self.bits) - 1

    @property
    def label(self) -> str:
        if self.name != "nbits":
            return self.name
        return f"nbits{self.bits}-g{self.group}-{'sym' if self.symmetric else 'asym'}"

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
        diagonal: how much each input matters). The format stores any scale, so this is
        still exactly its grid."""
        best = None
        for shrink in shrinks:
            scale, zero = self._fit_range(w.float() * shrink)
            error = (self.value(self.quantize(w, scale, zero), scale[:, None], zero[:, None]) - w) ** 2
            if importance is not None:
                error = error * importance[None, :]
            error = error.sum(dim=1)
            if best is None:
                best = (error, scale, zero)
            else:
                better = error < best[0]
                best = (torch.where(better, error, best[0]), torch.where(better, scale, best[1]),
                        torch.where(better, zero, best[2]))
        return best[1], best[2]

    def _fit_range(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero) covering the block's full range: scale is f16-representable; zero
        is the integer zero point (q4_1: the f16 block minimum)."""
        if self.name == "q4_1":
            low, high = w.min(dim=1).values, w.max(dim=1).values
            return _f16((high - low) / self.qmax), _f16(low)
        if self.name == "q8_0":
            return _f16(w.abs().max(dim=1).values / 127), torch.zeros(len(w))
        if self.symmetric:  # q4_0 and symmetric nbits: the signed extreme maps to -half
            half = 1 << (self.bits - 1)
            extreme = w.gather(1, w.abs().argmax(dim=1, keepdim=True))[:, 0]
            return _f16(extreme / -half), torch.full((len(w),), float(half))
        low = w.min(dim=1).values.clamp(max=0)
        high = w.max(dim=1).values.clamp(min=0)
        scale = _f16((high - low) / self.qmax)
        return scale, torch.round(-low / _nonzero(scale)).clamp(0, self.qmax)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integers q (as float) nearest to w on the grid; w [rows] or [rows, k]."""
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        if self.name == "q4_1":
            q = torch.round((w - zero) / _nonzero(scale))
        else:
            q = torch.round(w / _nonzero(scale)) + zero
        return q.clamp(self.qmin, self.qmax)

    def value(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """The weight the runtime computes from q: ggml and MatMulNBits both evaluate
        (q - zero)·scale in float32 (q4_1: q·scale + min), so this is bit-exact."""
        if self.name == "q4_1":
            return q * scale + zero
        return (q - zero) * scale


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


def grid_for_export(export, bits: int | None, group_size: int | None) -> Grid:
    """The grid of a recipe export target (gguf q4_0/q4_1/q8_0, onnx/ort int4/int8), checked
    against the step's own bits/group_size when it gives them."""
    if export.format == "gguf":
        if export.weights not in GGUF_GRIDS:
            raise UserError(f"GPTQ writes GGUF {', '.join(GGUF_GRIDS)} blocks, not "
                            f"'{export.weights}': choose one of those weights")
        grid = gguf_grid(export.weights)
    elif export.format in ("onnx", "ort"):
        if export.weights not in ("int4", "int8"):
            raise UserError(f"GPTQ writes ONNX int4/int8 (MatMulNBits), not '{export.weights}'")
        grid = Grid("nbits", int(export.weights[3:]), export.block_size, export.symmetric)
        if grid == Grid("nbits", 4, 32, True):  # the very same grid: share one GPTQ run
            grid = gguf_grid("q4_0")
    else:
        raise UserError(f"GPTQ cannot feed a {export.format} export: use gguf, onnx or ort")
    if bits is not None and bits != grid.bits:
        raise UserError(f"GPTQ bits={bits} but the export {export.format} {export.weights} "
                        f"stores {grid.bits}-bit weights: make them agree")
    if group_size is not None and group_size != grid.group:
        raise UserError(f"GPTQ group_size={group_size} but the export {export.format} "
                        f"{export.weights} uses blocks of {grid.group}: make them agree")
    return grid


def gguf_grid(name: str) -> Grid:
    bits, symmetric = GGUF_GRIDS[name]
    return Grid(name, bits, 32, symmetric)


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
    return Grid("nbits", bits, group_size, symmetric)
