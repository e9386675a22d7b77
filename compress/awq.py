"""Activation-aware scaling before GPTQ (AWQ, Lin et al. 2024), searched on the Hessians
GPTQ already holds and folded into the layer through its family's migrations.

Where a per-channel scale can move without changing the function (the family's `smooth`
list in edgellm/archs/, applied by compress/smoothquant.Migration: a norm or a linear
feeding some linears), the consumers' input columns are multiplied by s = aᵅ and the
producer's channels divided by it; a is each input channel's RMS on the calibration text
(the Hessian's diagonal), s is normalised so that √(max·min) = 1. α is chosen per place
from AutoAWQ's grid of 20 to minimise the output error of rounding the scaled weights to
the nearest point of their export grid, tr(ΔW H ΔWᵀ) with ΔW = Q(W·s)/s − W; α = 0 (no
scaling) is a candidate, so the rounding error never grows. The Hessians then follow the
scaled inputs exactly (H ← H / s sᵀ) and GPTQ solves on them.

Written here rather than taken from AutoAWQ or llm-compressor's AWQModifier: both search
by running the layer again per candidate on stored activations and round onto their own
int4 formats; the Hessian measures the same output error without another forward pass,
and the rounding must be the export's grid (Q4_0, Q5_0, MatMulNBits, MLX affine).
"""

from __future__ import annotations

import torch

from edgellm.compress.smoothquant import Migration, layer_migrations
from edgellm.grids import Grid, dequantize, fit_matrix

ALPHAS = tuple(i / 20 for i in range(20))  # AutoAWQ's search grid (n_grid = 20)


@torch.no_grad()
def scale_layer(layer: torch.nn.Module, config: dict, linears: dict[str, torch.nn.Linear],
                grids: dict[str, Grid | None], hessians: dict) -> list[float]:
    """Scale each of the layer's migrations by its best α (in place: weights and the
    consumers' Hessians); return the α chosen for each, 0.0 where nothing moved."""
    names = {id(module): name for name, module in linears.items()}
    chosen = []
    for migration in layer_migrations(layer, config):
        consumers = [names[id(c)] for c in migration.consumers]
        solved = [name for name in consumers if grids[name] is not None]
        hessian = hessians[consumers[0]]
        alpha, scale = (0.0, None) if not solved else best_scale(
            migration, [linears[n].weight.data for n in solved], [grids[n] for n in solved],
            hessian.matrix())
        if scale is not None:
            migration.move(scale)
            per_input = migration.per_input_channel(scale).double()
            hessian.sum /= torch.outer(per_input, per_input)
        chosen.append(alpha)
    return chosen


def best_scale(migration: Migration, weights: list[torch.Tensor], grids: list[Grid],
               hessian: torch.Tensor) -> tuple[float, torch.Tensor | None]:
    """(α, the producer channels' scale) with the least rounding error; (0.0, None) when
    no scaling beats leaving the weights as they are."""
    rms = migration.per_producer_channel(hessian.diagonal().clamp(min=0).sqrt())
    rms = rms.clamp(min=rms.max() * 1e-6 + 1e-12)
    best = (rounding_error(weights, grids, hessian, None), 0.0, None)
    for alpha in ALPHAS[1:]:
        scale = rms ** alpha
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = rounding_error(weights, grids, hessian, migration.per_input_channel(scale))
        if error < best[0]:
            best = (error, alpha, scale)
    return best[1], best[2]


def rounding_error(weights: list[torch.Tensor], grids: list[Grid], hessian: torch.Tensor,
                   per_input: torch.Tensor | None) -> float:
    """Σ tr(ΔW H ΔWᵀ) over the consumers, each rounded to the nearest point of its grid
    after its input columns are multiplied by `per_input` (None: as they are)."""
    total = 0.0
    for weight, grid in zip(weights, grids, strict=True):
        scaled = weight if per_input is None else weight * per_input
        q, scale, zero = fit_matrix(grid, scaled, None, (1.0,))
        rounded = dequantize(grid, q, scale, zero)
        delta = (rounded if per_input is None else rounded / per_input) - weight
        total += float(((delta @ hessian) * delta).sum())
    return total
