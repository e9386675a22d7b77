"""The second-order solver GPTQ and SparseGPT share (Frantar et al. 2022; Frantar & Alistarh 2023).

For one linear layer with weights W [rows, cols] and the Hessian H = 2/n Σ x xᵀ of its
inputs, process columns left to right; each column is rounded (GPTQ) or partly zeroed
(SparseGPT) and the error is spread over the columns not yet processed through the
upper Cholesky factor of H⁻¹, in lazy blocks so most of the work is one matrix product.
Written here because no maintained library does this on CPU onto an arbitrary export
grid (auto-gptq is archived; GPTQModel and llm-compressor round onto their own grids).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgellm.grids import Grid


class Hessian:
    """Running H = 2/n Σ x xᵀ over every input row a layer sees (float64 sums)."""

    def __init__(self, cols: int):
        self.sum = torch.zeros(cols, cols, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x.T @ x).double()
        self.rows += x.shape[0]

    def matrix(self) -> torch.Tensor:
        return (2 * self.sum / max(self.rows, 1)).float()


def inverse_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + λI)⁻¹ with λ = damp·mean(diag H), and the mask of
    dead columns (inputs that were always zero: their weights carry no information)."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H += damp * torch.mean(torch.diag(H)) * torch.eye(len(H))
    for attempt in range(5):  # raise damping until the factorization succeeds
        factor, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            break
        H += damp * (10 ** attempt) * torch.mean(torch.diag(H)) * torch.eye(len(H))
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True), dead


ColumnRule = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def obs_sweep(W: torch.Tensor, Hinv: torch.Tensor, rule: ColumnRule, block: int = 128,
              before_block: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """The shared column sweep: `rule(i, w, block_view)` returns column i's new values
    given its current values w; the rounding error is spread to the later columns.
    `before_block(i1, W1)` sees each block first (SparseGPT picks its masks there).
    Returns the new W (columns in the order given)."""
    W = W.clone().float()
    cols = W.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if before_block:
            before_block(i1, W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            new = rule(i1 + i, w, W1)
            err = (w - new) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = new
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


# range factors tried per block when fitting scales (see Grid.fit)
SHRINKS = tuple(1 - 0.03 * k for k in range(11))


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid: Grid, act_order: bool = True,
                  damp: float = 0.01, block: int = 128, shrinks: tuple[float, ...] = SHRINKS):
    """GPTQ onto `grid`: returns (q, scale, zero) with q [rows, cols] integers (as float)
    and scale/zero [rows, cols/group], such that dequantize(grid, q, scale, zero) is the
    solved weight. Groups are always the format's blocks of consecutive input columns; with
    act_order the columns are solved in order of decreasing H diagonal and each block's
    scale is fixed from the weights before solving (static groups), so the grid stays the
    file's. Each block's scale is chosen among `shrinks` of its range by the rounding
    error weighted with the Hessian diagonal."""
    rows, cols = W.shape
    importance = torch.diag(H).float()
    group = grid.group
    block = max(block, group) // group * group  # whole groups per lazy block
    W = W.clone().float()
    W[:, torch.diag(H) == 0] = 0  # dead inputs: nothing to preserve
    scale = torch.zeros(rows, cols // group)
    zero = torch.zeros(rows, cols // group)
    q = torch.zeros(rows, cols)
    if act_order:
        order = torch.argsort(torch.diag(H), descending=True)
        for g in range(cols // group):
            cols_g = slice(g * group, (g + 1) * group)
            scale[:, g], zero[:, g] = grid.fit(W[:, cols_g], importance[cols_g], shrinks)
    else:
        order = torch.arange(cols)
    Hinv, _ = inverse_factor(H[order][:, order], damp)
    W = W[:, order]

    def round_column(i: int, w: torch.Tensor, W1: torch.Tensor) -> torch.Tensor:
        col = int(order[i])
        g = col // group
        if not act_order and i % group == 0:  # fit each group as its first column comes up
            local = i % block
            scale[:, g], zero[:, g] = grid.fit(W1[:, local:local + group],
                                               importance[order[i:i + group]], shrinks)
        q[:, col] = grid.quantize(w, scale[:, g], zero[:, g])
        return grid.value(q[:, col], scale[:, g], zero[:, g])

    obs_sweep(W, Hinv, round_column, block)
    return q, scale, zero
