"""GPTQ towards the float model's outputs (asymmetric calibration, as in GPTAQ, Li et al.
2025): each linear is solved so that its quantized weights on the quantized model's inputs
reproduce what the float model computes on its own inputs.

Plain GPTQ minimises ‖(Ŵ − W) X̃‖² with X̃ the inputs the already-quantized layers produce,
so the error those layers made is carried forward. With X the float model's inputs to the
same linear (a second hidden-state stream run through the float layers), the objective
‖W X − Ŵ X̃‖² equals ‖(Ŵ − W′) X̃‖² plus a constant, where W′ is the least-squares fit
W′ = W + W Δ A⁻¹ with A = Σ x̃ x̃ᵀ and Δ = Σ (x − x̃) x̃ᵀ: GPTQ then solves onto W′ with
the same Hessian. W′ = W exactly where the streams agree (Δ = 0).

The fit is a ridge regression, A + λI with λ = RIDGE · mean diag A, far stronger than
GPTQ's 1% damping: on SmolLM2 (q_proj of layers 5, 15 and 25 against the MLX 4.5 bpw
budget's quantized stream, 12 windows of 512 fitted, 4 held out) a 1% ridge moved the
weights by 15% and cut the fitted windows' output error by 30–46% but the held-out
windows' by 5% at most (+12% on layer 25); λ = mean diag A moved them 2–3% and cut the
held-out error by 6–17%. Written here because GPTQ's own solve is (compress/solver.py); GPTAQ's reference
code folds the same term into the column sweep instead of correcting W first.
"""

from __future__ import annotations

import torch

from edgellm.compress.solver import Hessian

RIDGE = 1.0  # λ / mean diag A (see above)


class TargetedHessian(Hessian):
    """H of the quantized stream's inputs x̃, and Δ = Σ (x − x̃) x̃ᵀ against the float
    stream's inputs x to the same linear, token by token (float64 sums)."""

    def __init__(self, cols: int):
        super().__init__(cols)
        self.shift = torch.zeros(cols, cols, dtype=torch.float64)

    def add_pair(self, x: torch.Tensor, x_float: torch.Tensor) -> None:
        self.add(x)
        x = x.reshape(-1, x.shape[-1]).float()
        difference = x_float.reshape(-1, x.shape[-1]).float() - x
        self.shift += (difference.T @ x).double()


@torch.no_grad()
def correction(hessian: TargetedHessian, ridge: float) -> torch.Tensor:
    """M = Δ (A + λI)⁻¹ [in, in], λ = ridge · mean diag A, so that W′ = W + W M."""
    a = hessian.sum.clone()
    a.diagonal().add_(ridge * a.diagonal().mean().clamp(min=1e-12))
    factor, info = torch.linalg.cholesky_ex(a)
    if info:
        return torch.zeros_like(hessian.shift, dtype=torch.float32)
    # (Δ A⁻¹)ᵀ = A⁻¹ Δᵀ (A symmetric)
    return torch.cholesky_solve(hessian.shift.T.contiguous(), factor).T.float()


@torch.no_grad()
def retarget(linears: dict[str, torch.nn.Linear], names: list[str],
             hessian: TargetedHessian, ridge: float = RIDGE) -> float:
    """Move the weights of `names` (one shared input) to W′; returns ‖W′ − W‖ / ‖W‖."""
    m = correction(hessian, ridge)
    moved, total = 0.0, 0.0
    for name in names:
        weight = linears[name].weight
        delta = weight.data.float() @ m
        moved += float(delta.square().sum())
        total += float(weight.data.float().square().sum())
        weight.data += delta.to(weight.dtype)
    return (moved / max(total, 1e-30)) ** 0.5
