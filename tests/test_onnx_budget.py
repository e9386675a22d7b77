"""ONNX under a size budget: MatMulNBits/GatherBlockQuantized blocks packed as ONNX Runtime
reads them, the budget model wired so ONNX Runtime computes exactly the planned weights
(tied and untied embeddings, Gemma's scaled one), and the pipeline's budget variant within
its size, with GPTQ's integers carried as solved."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import halfway_budget_export, run_cli, save_beside, window_nll_of, write_tiny_recipe
from families import build_family

from edgellm.grids import NBits
from edgellm.recipe import ExportSpec


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group, cols", [(32, 96), (16, 80)])  # odd block counts: 3, 5
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_blocks_are_read_by_onnx_runtime_as_dequantized(bits, group, cols, symmetric, shared):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgellm.export.onnx_budget import fit_blocks
    from edgellm.export.onnx_nbits import gather_block_quantized, matmul_nbits

    rng = np.random.default_rng(bits + group + symmetric)
    weight = rng.normal(size=(40, cols)).astype(np.float32)
    blocks = fit_blocks(weight, NBits(bits, group, symmetric), np.ones(cols, np.float32))
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name="/lm_head/MatMul")
    gather = helper.make_node("Gather", ["table", "ids"], ["e"], name="/embed/Gather")
    new_matmul, inits = matmul_nbits(matmul, blocks, "head", accuracy_level=0)
    source = (*new_matmul.input[1:3], new_matmul.input[3] if len(new_matmul.input) > 3 else None)
    new_gather, extra, more = gather_block_quantized(gather, blocks, "embed", source if shared else None)
    graph = helper.make_graph(
        [new_matmul, *extra, new_gather], "blocks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, cols]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, None)], initializer=inits + more)
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x, ids = rng.normal(size=(3, cols)).astype(np.float32), np.array([0, 5, 39, 7, 7])
    y, e = session.run(None, {"x": x, "ids": ids})
    expected = blocks.dequantize()
    assert np.abs(expected - weight).max() > 0  # rounded, not passed through
    np.testing.assert_allclose(y, x @ expected.T, rtol=1e-5, atol=1e-5)
    assert np.array_equal(e, expected[ids])
    assert blocks.nbytes() == sum(len(i.raw_data) for i in inits)


@pytest.mark.parametrize("family", ["llama3", "mistral", "gemma3"])  # tied, untied, scaled
def test_a_budget_onnx_runs_exactly_its_planned_weights(family, tmp_path):
    """ONNX Runtime on the budget model scores like torch on an HF folder holding the very
    weights the plan wrote (accuracy_level 0: float activations), and the file fits."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.export.fisher import fisher_by_parameter
    from edgellm.export.onnx_budget import budget_plan, candidate_grid, export_budget_onnx, fit_blocks

    model_dir = build_family(family, tmp_path / family)

    def spec(mb, candidates):
        return ExportSpec(format="onnx", max_size_mb=mb, candidates=list(candidates),
                          accuracy_level=0)

    done = halfway_budget_export(model_dir, tmp_path, budget_plan, export_budget_onnx, spec,
                                 "int4", "int8")
    folder, record, budget = done.artifact, done.record, done.budget
    assert any(name.endswith("embed_tokens.weight") for name in record["tensor_types"])

    fisher = fisher_by_parameter(model_dir, done.calibration, done.work)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    params = dict(model.named_parameters())
    for name, candidate in record["tensor_types"].items():
        grid = candidate_grid(candidate, budget)
        blocks = fit_blocks(params[name].detach().numpy(), grid, fisher[name])
        params[name].data[:] = torch.from_numpy(blocks.dequantize())
    planned = save_beside(model, model_dir, tmp_path / "planned")
    float_nll = window_nll_of("torch", model_dir)
    planned_nll = window_nll_of("torch", planned)
    assert window_nll_of("onnx", folder) == pytest.approx(planned_nll, rel=1e-4)
    assert planned_nll != pytest.approx(float_nll, rel=1e-6)  # rounding happened


def test_an_onnx_budget_variant_fits_and_carries_gptq(tmp_path, tiny_llama):
    recipe = write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama, """
[[variant]]
name = "int4"
export = { format = "onnx", weights = "int4" }
[[variant]]
name = "int8"
export = { format = "onnx", weights = "int8" }
""")
    out = tmp_path / "out"
    assert run_cli("run", recipe, "--out", out).returncode == 0
    int4, int8 = (sum(f.stat().st_size for f in (out / n / "onnx").glob("model.onnx*"))
                  for n in ("int4", "int8"))
    budget_mb = (int4 + int8) / 2 / 1e6
    recipe.write_text(recipe.read_text() + f"""
[[variant]]
name = "budget"
export = {{ format = "onnx", max_size_mb = {budget_mb} }}
[[variant]]
name = "gptq-budget"
compress = [{{ method = "gptq" }}]
export = {{ format = "onnx", max_size_mb = {budget_mb} }}
""")
    result = run_cli("run", recipe, "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    for name in ("budget", "gptq-budget"):
        plan = json.loads((out / name / "allocation.json").read_text())
        assert rows[name]["size_bytes"] == plan["written_bytes"] <= budget_mb * 1e6
        assert rows[name]["weights"] == "mixed" and rows[name]["predicted_kl"] == plan["predicted_kl"]
        assert len(rows[name]["tensor_types"]) >= 2
        assert abs(rows[name]["ppl_delta_pct"]) < 5  # a working model, not noise
    assert "Tensor types of budget (chosen for ≤" in (out / "report.md").read_text()
    check_gptq_integers_carried(out)


def check_gptq_integers_carried(out):
    """Every matrix GPTQ solved (the decoder's linears and the tied embedding, as the
    lm_head) is in the ONNX file as its solved weights."""
    import onnx
    from onnx import helper, numpy_helper

    from edgellm.export.onnx_nbits import Blocks
    from edgellm.gptq_checkpoint import dequantized_state

    plan = json.loads((out / "gptq-budget" / "allocation.json").read_text())
    assert "model.embed_tokens.weight" in plan["tensor_types"]
    assert plan["gptq_tensors"] == len(plan["tensor_types"])
    (step,) = [p for p in (out / "_work" / "steps").glob("gptq-*") if p.suffix != ".resume"]
    solved = {n.removesuffix(".weight"): w.numpy() for n, w in dequantized_state(step).items()}
    graph = onnx.load(out / "gptq-budget" / "onnx" / "model.onnx").graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    found = 0
    for node in (n for n in graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bits, block, n_out = attrs["bits"], attrs["block_size"], attrs["N"]
        packed = inits[node.input[1]].reshape(n_out, -1)
        q = packed if bits == 8 else np.stack([packed & 15, packed >> 4], -1).reshape(n_out, -1)
        scale = inits[node.input[2]].reshape(n_out, -1)
        if len(node.input) > 3:
            zp = inits[node.input[3]].reshape(n_out, -1)
            zero = zp if bits == 8 else np.stack([zp & 15, zp >> 4], -1).reshape(n_out, -1)
            zero = zero[:, :scale.shape[1]]
        else:
            zero = np.full(scale.shape, 1 << (bits - 1))
        weight = Blocks(q, scale, zero, bits, block).dequantize()
        found += any(w.shape == weight.shape and np.array_equal(w, weight) for w in solved.values())
    assert found >= len(plan["tensor_types"])
