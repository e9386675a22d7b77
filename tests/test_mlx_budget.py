"""MLX under a size budget: mlx-lm's converter writes each matrix with its planned bits and
group size (tied and untied embeddings, Gemma 3), the folder fits, and MLX computes the
weights the plan priced."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import halfway_budget_export, save_beside, window_nll_of
from families import build_family

from edgellm.recipe import ExportSpec


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma3"])  # tied, untied, Gemma 3
def test_a_budget_mlx_folder_holds_its_plan_and_runs_it(family, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.export.fisher import fisher_by_parameter
    from edgellm.export.mlx_budget import (
        budget_plan,
        candidate_bits,
        computed,
        export_budget_mlx,
        searched,
    )

    model_dir = build_family(family, tmp_path / family)

    def spec(mb, candidates):
        return ExportSpec(format="mlx", max_size_mb=mb, candidates=list(candidates))

    done = halfway_budget_export(model_dir, tmp_path, budget_plan, export_budget_mlx, spec,
                                 "q4-g32", "q8-g32")
    folder, record = done.artifact, done.record
    written = json.loads((folder / "config.json").read_text())["quantization"]
    for name, candidate in record["tensor_types"].items():
        bits, group = candidate_bits(candidate)
        assert written[name.removesuffix(".weight")] == {"bits": bits, "group_size": group}

    fisher = fisher_by_parameter(model_dir, done.calibration, done.work)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    params = dict(model.named_parameters())
    for name, candidate in record["tensor_types"].items():
        tensors = searched(params[name].detach().numpy(), *candidate_bits(candidate), fisher[name])
        params[name].data[:] = torch.from_numpy(computed(tensors, *candidate_bits(candidate)))
    planned = save_beside(model, model_dir, tmp_path / "planned")
    mlx_nll, planned_nll = window_nll_of("mlx", folder), window_nll_of("torch", planned)
    float_nll = window_nll_of("torch", model_dir)
    assert mlx_nll == pytest.approx(planned_nll, rel=0.005)  # f16 activations: ~3 digits
    assert abs(mlx_nll - planned_nll) < abs(mlx_nll - float_nll)  # the planned weights, not float


def test_gptq_inside_an_mlx_budget_is_written_as_solved(tmp_path, tiny_llama):
    """GPTQ solves every planned matrix onto its bits and groups (3 and 5 bits included; the
    tied embedding as the lm_head); the folder holds those integers, within the budget."""
    from conftest import run_cli, write_tiny_recipe
    from safetensors.numpy import load_file

    from edgellm.export.gguf_gptq import packed_linears

    recipe = write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama, """
[[variant]]
name = "b"
compress = [{ method = "gptq" }]
export = { format = "mlx", target_bpw = 6, candidates = ["q3-g32", "q5-g64", "q8-g64"] }
""")
    out = tmp_path / "out"
    result = run_cli("run", recipe, "--out", out)
    assert result.returncode == 0, result.stderr
    plan = json.loads((out / "b" / "allocation.json").read_text())
    assert "model.embed_tokens.weight" in plan["tensor_types"]
    assert plan["gptq_tensors"] == len(plan["tensor_types"])
    assert plan["written_bytes"] <= plan["max_size_mb"] * 1e6
    assert len(set(plan["tensor_types"].values())) >= 2
    (step,) = [p for p in (out / "_work" / "steps").glob("gptq-*") if p.suffix != ".resume"]
    stored = {}
    for path in (out / "b" / "mlx").glob("*.safetensors"):
        stored.update(load_file(path))
    from edgellm.export.mlx_gptq import mlx_tensors

    widths = {name: int(c[1]) for name, c in plan["tensor_types"].items()}
    assert set(widths.values()) - {4, 8}  # widths whose integers straddle MLX's words
    for name, linear in packed_linears(step).items():
        for part, value in mlx_tensors(linear, widths[f"{name}.weight"]).items():
            assert np.array_equal(stored[f"{name}.{part}"], value), (name, part)


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_the_searched_groups_beat_mlx_rounding_where_the_fisher_weighs(bits):
    """A heavy-tailed matrix: MLX computes the searched tensors exactly as stored, and their
    Fisher-weighted error is below mlx-lm's own rounding (full min/max range)."""
    import mlx.core as mx

    from edgellm.export.mlx_budget import computed, searched

    rng = np.random.default_rng(0)
    weight = (rng.standard_t(3, size=(64, 256)) * 0.02).astype(np.float32)
    fisher = rng.gamma(0.5, size=256).astype(np.float32)
    tensors = searched(weight, bits, 64, fisher)
    ours = computed(tensors, bits, 64)
    assert ours.shape == weight.shape and tensors["weight"].dtype == np.uint32
    q, scales, biases = mx.quantize(mx.array(weight.astype(np.float16)), group_size=64, bits=bits)
    theirs = np.array(mx.dequantize(q, scales, biases, group_size=64, bits=bits).astype(mx.float32))
    assert sum(t.nbytes for t in tensors.values()) == q.nbytes + scales.nbytes + biases.nbytes

    def damage(values):
        return float((fisher * ((values - weight) ** 2).sum(axis=0)).sum())

    assert damage(ours) < damage(theirs)
