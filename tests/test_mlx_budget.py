"""MLX under a size budget: mlx-lm's converter writes each matrix with its planned bits and
group size (tied and untied embeddings, Gemma 3), the folder fits, and MLX computes the
weights the plan priced."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import save_beside, window_nll_of
from families import build_family

from edgellm.recipe import CalibrationSpec, ExportSpec


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma3"])  # tied, untied, Gemma 3
def test_a_budget_mlx_folder_holds_its_plan_and_runs_it(family, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.export.mlx_budget import budget_plan, candidate_bits, export_budget_mlx, rounded

    model_dir = build_family(family, tmp_path / family)
    calibration = CalibrationSpec(text="wikitext-2-valid", samples=4, seqlen=64)
    work = tmp_path / "work"
    work.mkdir()

    def spec(mb, candidates=("q4-g32", "q8-g32")):
        return ExportSpec(format="mlx", max_size_mb=mb, candidates=list(candidates))

    low = budget_plan(model_dir, spec(100, ["q4-g32"]), work, calibration)["predicted_bytes"]
    high = budget_plan(model_dir, spec(100, ["q8-g32"]), work, calibration)["predicted_bytes"]
    budget = spec((low + high) / 2 / 1e6)
    folder = export_budget_mlx(model_dir, tmp_path / "v" / "mlx", budget, work, calibration)
    record = json.loads((tmp_path / "v" / "allocation.json").read_text())
    assert len(set(record["tensor_types"].values())) == 2  # a mixture
    assert record["written_bytes"] <= record["predicted_bytes"] <= budget.max_size_mb * 1e6
    written = json.loads((folder / "config.json").read_text())["quantization"]
    for name, candidate in record["tensor_types"].items():
        bits, group = candidate_bits(candidate)
        assert written[name.removesuffix(".weight")] == {"bits": bits, "group_size": group}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    params = dict(model.named_parameters())
    for name, candidate in record["tensor_types"].items():
        values, _ = rounded(params[name].detach().numpy(), *candidate_bits(candidate))
        params[name].data[:] = torch.from_numpy(values)
    planned = save_beside(model, model_dir, tmp_path / "planned")
    mlx_nll, planned_nll = window_nll_of("mlx", folder), window_nll_of("torch", planned)
    float_nll = window_nll_of("torch", model_dir)
    assert mlx_nll == pytest.approx(planned_nll, rel=0.005)  # f16 activations: ~3 digits
    assert abs(mlx_nll - planned_nll) < abs(mlx_nll - float_nll)  # the planned weights, not float


def test_gptq_inside_an_mlx_budget_is_written_as_solved(tmp_path, tiny_llama):
    """GPTQ solves every decoder matrix onto its planned bits and groups (3 and 5 bits included);
    the folder holds those integers (the embedding MLX rounds), within the budget."""
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
    decoder = [n for n in plan["tensor_types"] if ".layers." in n]
    assert plan["gptq_tensors"] == len(decoder) > 0
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
