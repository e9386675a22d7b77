"""GPTQ-aware prices for size budgets: the survivor share per column predicts what GPTQ
leaves of a matrix's rounding error, and a plan made for GPTQ is priced with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def correlated_hessian(cols: int, seed: int = 0) -> torch.Tensor:
    """Inputs with a few shared factors and some loud channels, as a decoder layer's are."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(4096, 8, generator=gen) @ torch.randn(8, cols, generator=gen)
    X += 0.3 * torch.randn(4096, cols, generator=gen)
    X[:, :4] *= 6
    return 2 * X.T @ X / len(X)


def test_survivor_shares_are_fractions_and_the_last_column_keeps_its_error():
    from edgellm.export.gptq_pricing import survivor_share

    H = correlated_hessian(64)
    share = survivor_share(H)
    assert share.shape == (64,) and np.all(share > 0) and np.all(share <= 1)
    last = int(torch.argsort(torch.diag(H), descending=True)[-1])  # solved last: nothing after it
    assert share[last] == pytest.approx(1.0, abs=0.02)
    assert share.mean() < 0.5  # correlated inputs: GPTQ moves most of the error away


@pytest.mark.parametrize("bits", [8, 4])
def test_the_share_predicts_gptqs_output_error(bits):
    """Σ_j t_j·H_jj·Σ_i e_ij² (e: round-to-nearest on the same scales) is GPTQ's measured
    output error tr(ΔW H ΔWᵀ) (GPTQ with its default 1% damping) within 20%, where
    rounding's own is tens of times larger."""
    from edgellm.compress.solver import gptq_quantize
    from edgellm.export.gptq_pricing import survivor_share
    from edgellm.grids import NBits, dequantize, fit_matrix

    cols = 128
    H = correlated_hessian(cols, seed=1)
    W = torch.randn(96, cols, generator=torch.Generator().manual_seed(2)) * 0.05
    grid = NBits(bits, 32, False)
    q, scale, zero = fit_matrix(grid, W, torch.diag(H), (1.0,))
    rounding = dequantize(grid, q, scale, zero) - W
    predicted = float((torch.from_numpy(survivor_share(H)) * torch.diag(H) *
                       (rounding ** 2).sum(dim=0)).sum())
    q, scale, zero = gptq_quantize(W, H, grid, act_order=True, shrinks=(1.0,), refit=False)
    solved = dequantize(grid, q, scale, zero) - W
    measured = float(((solved @ H) * solved).sum())
    plain = float(((rounding @ H) * rounding).sum())
    assert plain > 20 * measured
    assert 0.8 < predicted / measured < 1.2, (predicted, measured, plain)


def test_a_plan_made_for_gptq_prices_below_the_rounding_plan(tmp_path, tiny_llama):
    """The same budget planned for GPTQ predicts less damage than for rounding alone
    (every decoder matrix is cheaper), and says which it was priced for."""
    from conftest import load_tensors

    from edgellm.export.budget_spec import resolve_bpw
    from edgellm.export.mlx_budget import budget_plan
    from edgellm.recipe import CalibrationSpec, ExportSpec

    spec = ExportSpec(format="mlx", target_bpw=6, candidates=["q3-g32", "q5-g64", "q8-g64"])
    resolve_bpw(spec, sum(t.numel() for t in load_tensors(tiny_llama).values()))
    calibration = CalibrationSpec(samples=2, seqlen=64)
    rounding = budget_plan(tiny_llama, spec, tmp_path, calibration)
    solved = budget_plan(tiny_llama, spec, tmp_path, calibration, gptq=True)
    assert (rounding["priced_for"], solved["priced_for"]) == ("rounding", "gptq")
    assert solved["predicted_kl"] < rounding["predicted_kl"]
    assert solved["predicted_bytes"] <= spec.max_size_mb * 1e6


def test_the_fisher_pass_shares_the_pricing_pass_and_both_come_out_as_alone(tmp_path, tiny_llama):
    """A budget priced for GPTQ computes the Fisher pass inside the survivor shares' pass
    (the same windows): same values as each computed alone."""
    from edgellm.export.fisher import fisher_by_parameter, fisher_cache
    from edgellm.export.gptq_pricing import gptq_attenuation
    from edgellm.recipe import CalibrationSpec

    calibration = CalibrationSpec(text="wikitext-2-valid", samples=4, seqlen=64)
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    alone.mkdir(), shared.mkdir()
    fisher = fisher_by_parameter(tiny_llama, calibration, alone)
    shares = gptq_attenuation(tiny_llama, calibration, alone)
    together = gptq_attenuation(tiny_llama, calibration, shared)
    assert fisher_cache(calibration, shared).is_file()
    assert shares.keys() == together.keys() and shares
    assert all(np.array_equal(shares[name], together[name]) for name in shares)
    with np.load(fisher_cache(calibration, shared)) as stored:
        assert set(stored.files) == set(fisher)
        assert all(np.array_equal(stored[name], fisher[name]) for name in fisher)
