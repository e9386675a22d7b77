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

from edgellm.grids import SHRINKS, Grid, nearest


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


class DiagonalHessian(Hessian):
    """Only H's diagonal, 2/n Σ x_j² (what Wanda reads): a sum of squares per input instead
    of a cols × cols product per batch (most of Wanda's time on SmolLM2 went to the full
    products it then threw away)."""

    def __init__(self, cols: int):
        self.sum = torch.zeros(cols, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.sum += (x * x).sum(dim=0)
        self.rows += x.shape[0]

    def matrix(self) -> torch.Tensor:
        return torch.diag(2 * self.sum / max(self.rows, 1)).float()


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



def gptq_quantize(W: torch.Tensor, H: torch.Tensor, grid: Grid, act_order: bool = True,
                  damp: float = 0.01, block: int = 128, shrinks: tuple[float, ...] = SHRINKS,
                  refit: bool = True):
    """GPTQ onto `grid`: returns (q, scale, zero) with q [rows, cols] integers (as float)
    and scale/zero [rows, cols/group], such that dequantize(grid, q, scale, zero) is the
    solved weight. Groups are always the format's blocks of consecutive input columns; with
    act_order the columns are solved in order of decreasing H diagonal and each block's
    scale is fixed before solving (static groups), so the grid stays the file's.

    Scales: each block's is first chosen among `shrinks` of its range by the rounding error
    weighted with the Hessian diagonal. With `refit`, every row's scales are then re-solved
    against the full Hessian (refit_scales), once on the round-to-nearest integers before
    the sweep (static groups) and once on the sweep's integers after it."""
    W = W.clone().float()
    W[:, torch.diag(H) == 0] = 0  # dead inputs: nothing to preserve
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(W.shape[1])
    Hinv, _ = inverse_factor(H[order][:, order], damp)
    fixed = None
    if act_order:
        scale, zero = _static_scales(W, H, grid, shrinks)
        if refit:
            scale = refit_scales(W, H, grid, nearest(grid, W, scale, zero), scale, zero, damp)
        fixed = scale, zero
    q, scale, zero = _sweep(W, H, Hinv, order, grid, block, shrinks, fixed)
    if refit:
        scale = refit_scales(W, H, grid, q, scale, zero, damp)
    return q, scale, zero


def _static_scales(W, H, grid: Grid, shrinks) -> tuple[torch.Tensor, torch.Tensor]:
    """Every block's (scale, zero) fitted on the weights before any column is solved."""
    return grid.fit_blocks(W, torch.diag(H).float(), shrinks)


def _sweep(W, H, Hinv, order, grid: Grid, block: int, shrinks, fixed):
    """One GPTQ sweep of W's columns in `order` onto the grid: onto the `fixed` (scale, zero)
    when given, else fitting each block as its first column comes up (order must then be
    the natural one, and is)."""
    rows, cols = W.shape
    group = grid.group
    block = max(block, group) // group * group  # whole groups per lazy block
    if fixed is not None:
        return _sweep_fixed(W, Hinv, order, grid, block, *fixed)
    importance = torch.diag(H).float()
    scale, zero = torch.zeros(rows, cols // group), torch.zeros(rows, cols // group)
    q = torch.zeros(rows, cols)

    def round_column(i: int, w: torch.Tensor, W1: torch.Tensor) -> torch.Tensor:
        g = i // group
        if i % group == 0:  # fit each group as its first column comes up
            local = i % block
            scale[:, g], zero[:, g] = grid.fit(W1[:, local:local + group],
                                               importance[i:i + group], shrinks)
        q[:, i] = grid.quantize(w, scale[:, g], zero[:, g])
        return grid.value(q[:, i], scale[:, g], zero[:, g])

    obs_sweep(W, Hinv, round_column, block)
    return q, scale, zero


def _sweep_fixed(W, Hinv, order, grid: Grid, block: int, scale, zero):
    """The sweep onto scales fixed before it (act_order's static groups): every column's
    scale and zero are laid out in sweep order up front, so rounding a column is a few
    elementwise ops (the per-column Python work is most of a small model's solve)."""
    S = scale.repeat_interleave(grid.group, dim=1)[:, order].T.contiguous()
    Z = zero.repeat_interleave(grid.group, dim=1)[:, order].T.contiguous()
    Q = torch.empty_like(S)  # [cols, rows] in sweep order

    def round_column(i: int, w: torch.Tensor, W1: torch.Tensor) -> torch.Tensor:
        Q[i] = grid.quantize(w, S[i], Z[i])
        return grid.value(Q[i], S[i], Z[i])

    obs_sweep(W[:, order], Hinv, round_column, block)
    q = torch.empty(W.shape)
    q[:, order] = Q.T
    return q, scale, zero


def block_gram(V: torch.Tensor, H: torch.Tensor, group: int, chunk_elems: int = 1 << 24):
    """A[r] = V_rᵀ H V_r for each row's block matrix V_r [cols, blocks] (V_r holds row r's
    values v on block g's columns and zero elsewhere), computed in row chunks: [rows, blocks, blocks]."""
    rows, cols = V.shape
    blocks = cols // group
    Hb = H.reshape(cols, blocks, group)
    out = torch.empty(rows, blocks, blocks)
    step = max(1, chunk_elems // (cols * blocks))
    for r1 in range(0, rows, step):
        Vc = V[r1:r1 + step]
        T = torch.einsum("ihk,rhk->rih", Hb, Vc.reshape(-1, blocks, group))  # (H V_r)[i, h]
        out[r1:r1 + step] = torch.einsum("rgk,rgkh->rgh", Vc.reshape(-1, blocks, group),
                                         T.reshape(-1, blocks, group, blocks))
    return out


def refit_scales(W: torch.Tensor, H: torch.Tensor, grid: Grid, q: torch.Tensor,
                 scale: torch.Tensor, zero: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """With the integers q fixed, the block scales of each row that minimise the layer's
    output error (w − ŵ)ᵀ H (w − ŵ), solved jointly over the row's blocks (ŵ is linear in
    them: ŵ = Σ_g s_g·v_g with v_g = q − zero on block g). Scales are stored as float16;
    a row whose rounded scales would not lower its error keeps its old ones."""
    cols = W.shape[1]
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    H[dead, :] = 0
    H[:, dead] = 0
    W = W.float().clone()
    W[:, dead] = 0
    V = q.float() - zero.repeat_interleave(grid.group, dim=1)  # every GPTQ grid: (q − zero)·scale
    A = block_gram(V, H, grid.group)
    b = ((W @ H) * V).reshape(len(W), -1, grid.group).sum(dim=2)
    ridge = 1e-6 * A.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-12)
    A = A + ridge[:, None, None] * torch.eye(A.shape[1])
    solved = torch.linalg.solve(A.double(), b.double()).float().to(torch.float16).float()
    solved = torch.where(torch.isfinite(solved), solved, scale)
    return torch.where((_row_error(W, H, V, solved) < _row_error(W, H, V, scale))[:, None],
                       solved, scale)


def _row_error(W, H, V, scale) -> torch.Tensor:
    group = V.shape[1] // scale.shape[1]
    E = W - V * scale.repeat_interleave(group, dim=1)
    return ((E @ H) * E).sum(dim=1)
