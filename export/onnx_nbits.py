"""Write given integers into an ONNX graph: MatMul → MatMulNBits, Gather → GatherBlockQuantized.

A size budget gives each weight matrix its own bits and block size, and GPTQ solves some of
them: neither ONNX Runtime's quantizer (one setting for the whole graph, its own rounding)
nor the onnxruntime-genai builder (one precision) writes that, so the blocks are packed
here in ONNX Runtime's contrib-op layouts (com.microsoft MatMulNBits and
GatherBlockQuantized):
  B            uint8 [N, blocks, block·bits/8]  row n of W (output n), 4-bit: even k low nibble
  scales       float32 [N, blocks]
  zero_points  uint8 [N, ⌈blocks·bits/8⌉]        4-bit: even block low nibble; left out when
                                                 every zero point is 2^(bits−1) (symmetric)
and W[n, k] = (q[n, k] − zero[n, k/block]) · scale[n, k/block]. A tied embedding reads the
lm_head's blocks (GatherBlockQuantized over B reshaped to [V, K·bits/8]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper, numpy_helper

DOMAIN = "com.microsoft"


@dataclass
class Blocks:
    """One matrix on an NBits grid: q [N, K] integers, scale/zero [N, K/block]."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    block: int

    def packed(self) -> np.ndarray:
        """B as MatMulNBits stores it: uint8 [N, blocks, block·bits/8]."""
        rows, cols = self.q.shape
        return pack(self.q, self.bits).reshape(rows, cols // self.block, -1)

    def zero_points(self) -> np.ndarray | None:
        """uint8 [N, ⌈blocks·bits/8⌉], or None when every zero is the default 2^(bits−1)."""
        if (self.zero == 1 << (self.bits - 1)).all():
            return None
        zero = self.zero
        if self.bits == 4 and zero.shape[1] % 2:  # a row's last byte holds one zero point
            zero = np.pad(zero, ((0, 0), (0, 1)), constant_values=1 << (self.bits - 1))
        return pack(zero, self.bits)

    def nbytes(self) -> int:
        """Bytes of the initializers: B, float32 scales, zero points when stored."""
        zero = self.zero_points()
        return self.packed().nbytes + self.scale.size * 4 + (0 if zero is None else zero.nbytes)

    def dequantize(self) -> np.ndarray:
        scale = np.repeat(self.scale.astype(np.float32), self.block, axis=1)
        zero = np.repeat(self.zero.astype(np.float32), self.block, axis=1)
        return (self.q.astype(np.float32) - zero) * scale


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers [rows, m] as uint8 [rows, m·bits/8], low nibble first for 4 bits."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    return values[:, 0::2] | (values[:, 1::2] << 4)


def matmul_nbits(node, blocks: Blocks, prefix: str, accuracy_level: int) -> tuple[object, list]:
    """The MatMulNBits node replacing MatMul `node` (A @ W^T with W = blocks) and its
    initializers."""
    rows, cols = blocks.q.shape
    inits = [numpy_helper.from_array(blocks.packed(), f"{prefix}.qweight"),
             numpy_helper.from_array(blocks.scale.astype(np.float32).reshape(-1), f"{prefix}.scales")]
    zero = blocks.zero_points()
    if zero is not None:
        inits.append(numpy_helper.from_array(zero.reshape(-1), f"{prefix}.qzeros"))
    new = helper.make_node("MatMulNBits", [node.input[0], *(i.name for i in inits)],
                           list(node.output), name=node.name.replace("MatMul", "MatMulNBits"),
                           domain=DOMAIN, K=cols, N=rows, bits=blocks.bits,
                           block_size=blocks.block, accuracy_level=accuracy_level)
    return new, inits


def gather_block_quantized(node, blocks: Blocks, prefix: str,
                           shared: tuple[str, str, str | None] | None = None
                           ) -> tuple[object, list, list]:
    """(GatherBlockQuantized node, extra nodes, initializers) replacing the embedding
    Gather `node`: over the blocks' own initializers, or over a MatMulNBits' (`shared`: its
    B, scales and zero points or None, reshaped to the gather's [V, ...] shapes)."""
    vocab, width = blocks.q.shape
    nodes, inits = [], []
    if shared is None:
        zero = blocks.zero_points()
        inits = [numpy_helper.from_array(blocks.packed().reshape(vocab, -1), f"{prefix}.qweight"),
                 numpy_helper.from_array(blocks.scale.astype(np.float32), f"{prefix}.scales"),
                 *([] if zero is None else [numpy_helper.from_array(zero, f"{prefix}.qzeros")])]
        sources = [i.name for i in inits]
    else:
        sources = []
        for what, name in zip(("data", "scales", "zeros"), shared, strict=True):
            if name is not None:
                sources.append(_reshaped(name, [vocab, -1], f"{prefix}.{what}", nodes, inits))
    data, scales, *zeros = sources
    new = helper.make_node("GatherBlockQuantized", [data, node.input[1], scales, *zeros],
                           list(node.output), name=f"{prefix}/GatherBlockQuantized",
                           domain=DOMAIN, bits=blocks.bits, block_size=blocks.block,
                           gather_axis=0, quantize_axis=1)
    return new, nodes, inits


def _reshaped(name: str, shape: list[int], prefix: str, nodes: list, inits: list) -> str:
    """`name` reshaped to `shape` by a Reshape node (appended with its shape initializer)."""
    target = numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{prefix}_shape")
    nodes.append(helper.make_node("Reshape", [name, target.name], [f"{prefix}_shared"],
                                  name=f"{prefix}/Reshape"))
    inits.append(target)
    return f"{prefix}_shared"
