"""GGUF under a size budget (export/gguf_budget.py): the allocation respects the budget,
never predicts more damage for a larger one, refuses a budget below the smallest file, and
the file llama.cpp writes has the planned types and the planned size."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import run_cli, write_tiny_recipe

from edgellm.errors import UserError
from edgellm.export.allocation import allocate
from edgellm.resources import count_parameters

TYPES = {"Q4_0": 4.5, "Q5_0": 5.5, "Q8_0": 8.5}


def synthetic_table(seed: int = 0, tensors: int = 40) -> dict:
    """Tensors of random widths; damage falls with bits, tensors differ in sensitivity."""
    rng = random.Random(seed)
    table = {}
    for i in range(tensors):
        elements, sensitivity = rng.choice([4096, 16384, 65536]), rng.uniform(0.01, 10)
        table[f"blk.{i}.weight"] = {
            kind: (int(elements * bits / 8), sensitivity * 2.0 ** (-2 * bits))
            for kind, bits in TYPES.items()}
    return table


def test_the_plan_fits_every_budget_and_more_room_never_predicts_more_damage():
    table, fixed = synthetic_table(), 10_000
    smallest = fixed + sum(min(b for b, _ in t.values()) for t in table.values())
    largest = fixed + sum(max(b for b, _ in t.values()) for t in table.values())
    previous = None
    for budget in range(smallest, largest + 20_000, (largest - smallest) // 25):
        types, size, damage = allocate(table, fixed, budget, align=1)
        assert size <= budget
        assert size == fixed + sum(table[n][k][0] for n, k in types.items())
        assert damage == pytest.approx(sum(table[n][k][1] for n, k in types.items()), rel=1e-9)
        if previous is not None:
            assert damage <= previous + 1e-12
        previous = damage
    # upgrades are rounded up to units of 1/50,000 of the room: a plan may leave that little
    room = (largest - smallest) // 1000
    assert set(allocate(table, fixed, largest + room, align=1)[0].values()) == {"Q8_0"}


def test_the_plan_beats_every_single_type_that_fits():
    table, fixed = synthetic_table(seed=3), 0
    for kind in TYPES:
        size = sum(t[kind][0] for t in table.values())
        uniform = sum(t[kind][1] for t in table.values())
        assert allocate(table, fixed, size, align=1)[2] <= uniform + 1e-12


def test_a_budget_below_the_smallest_file_names_the_smallest():
    table = synthetic_table()
    smallest = sum(min(b for b, _ in t.values()) for t in table.values())
    with pytest.raises(UserError, match=f"smallest GGUF .* \\({smallest / 1e6:.1f} MB\\)"):
        allocate(table, 0, smallest - 1, align=1)


def test_a_tensor_no_candidate_fits_is_left_out_of_the_plan():
    table = synthetic_table(tensors=3)
    table["odd.weight"] = {}  # its width fits no block: llama.cpp's own fallback, counted as fixed
    types, _, _ = allocate(table, 0, 10**9, align=1)
    assert "odd.weight" not in types and len(types) == 3


def test_padding_is_counted_per_tensor():
    table = {"a": {"Q4_0": (18, 1.0), "Q8_0": (34, 0.0)}, "b": {"Q4_0": (18, 1.0), "Q8_0": (34, 0.0)}}
    assert allocate(table, 0, 64, align=32)[0] == {"a": "Q4_0", "b": "Q4_0"}  # 34 pads to 64
    assert allocate(table, 0, 96, align=32)[0] in ({"a": "Q8_0", "b": "Q4_0"}, {"a": "Q4_0", "b": "Q8_0"})


@pytest.mark.parametrize("export, message", [
    ('{ format = "gguf", weights = "q4_0", max_size_mb = 1 }', "leave weights out"),
    ('{ format = "ort", max_size_mb = 1 }', "max_size_mb only applies to gguf/onnx/mlx exports"),
    ('{ format = "mlx", max_size_mb = 0.001 }', "below the smallest MLX folder of this model"),
    ('{ format = "mlx", target_bpw = 9.5 }', "above the largest candidate type (q8-g64: 8.50 bpw)"),
    ('{ format = "mlx", max_size_mb = 1, candidates = ["q4-g16"] }', "candidates q4-g16"),
    ('{ format = "gguf", weights = "mixed" }', "weights 'mixed' needs max_size_mb"),
    ('{ format = "gguf", max_size_mb = 1, candidates = ["q9"] }', "candidates q9"),
    ('{ format = "gguf", max_size_mb = 0.001 }', "below the smallest GGUF of this model"),
    ('{ format = "gguf", target_bpw = 2 }', "below the smallest candidate type (q3_k: 3.44 bpw)"),
    ('{ format = "gguf", target_bpw = 12 }', "above the largest candidate type (q8_0: 8.50 bpw)"),
    ('{ format = "gguf", target_bpw = 4, max_size_mb = 1 }', "give one of them"),
    ('{ format = "torch", weights = "f32", target_bpw = 4 }',
     "target_bpw only applies to gguf/onnx/mlx exports"),
    ('{ format = "onnx", max_size_mb = 0.001 }', "below the smallest ONNX file of this model"),
    ('{ format = "onnx", target_bpw = 3 }', "below the smallest candidate type (int4-b128: 4.28 bpw)"),
    ('{ format = "onnx", max_size_mb = 1, candidates = ["int3"] }', "candidates int3"),
    ('{ format = "onnx", max_size_mb = 1, lm_head_bits = 4 }', "leave lm_head_bits out"),
    ('{ format = "mlx", weights = "q4", max_size_mb = 1 }', "leave weights out"),
])
def test_bad_budgets_are_one_line_before_any_work(tmp_path, tiny_llama, export, message):
    recipe = write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama,
                               f'[[variant]]\nname = "b"\nexport = {export}\n')
    result = run_cli("run", recipe, "--out", tmp_path / "out")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_budget_gguf_has_the_planned_types_and_size_and_is_reported(tmp_path, tiny_llama):
    from edgellm.gguf_bounds import read_gguf_meta

    recipe = write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama, """
[[variant]]
name = "q4"
export = { format = "gguf", weights = "q4_0", imatrix = true }
[[variant]]
name = "q8"
export = { format = "gguf", weights = "q8_0" }
""")
    out = tmp_path / "out"
    assert run_cli("run", recipe, "--out", out).returncode == 0
    q4, q8 = ((out / n / "model.gguf").stat().st_size for n in ("q4", "q8"))
    budget_mb = (q4 + (q8 - q4) // 2) / 1e6  # halfway: some tensors must stay below q8_0
    params = count_parameters(sorted(Path(tiny_llama).glob("*.safetensors")))
    target_bpw = round((q4 + (q8 - q4) // 3) * 8 / params, 3)  # a third of the way, as bits
    recipe.write_text(recipe.read_text() + f"""
[[variant]]
name = "budget"
export = {{ format = "gguf", max_size_mb = {budget_mb}, candidates = ["q4_0", "q5_0", "q8_0"] }}
[[variant]]
name = "gptq-budget"
compress = [{{ method = "gptq" }}]
export = {{ format = "gguf", max_size_mb = {budget_mb}, candidates = ["q4_0", "q5_0", "q8_0"] }}
[[variant]]
name = "bpw-budget"
export = {{ format = "gguf", target_bpw = {target_bpw}, candidates = ["q4_0", "q5_0", "q8_0"] }}
""")
    result = run_cli("run", recipe, "--out", out)
    assert result.returncode == 0, result.stderr
    bpw_row = next(r for r in json.loads((out / "report.json").read_text())["variants"]
                   if r["name"] == "bpw-budget")
    assert bpw_row["weights"] == "mixed" and bpw_row["bits_per_weight"] <= target_bpw
    assert bpw_row["size_bytes"] <= target_bpw * params / 8 and len(bpw_row["tensor_types"]) >= 2
    path = out / "budget" / "model.gguf"
    plan = json.loads((out / "budget" / "allocation.json").read_text())
    assert path.stat().st_size == plan["predicted_bytes"] <= budget_mb * 1e6
    storage = read_gguf_meta(path).storage
    assert {name: storage[name][0] for name in plan["tensor_types"]} == plan["tensor_types"]
    assert len(set(plan["tensor_types"].values())) >= 2  # a mixture, not one type
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["variants"] if r["name"] == "budget")
    assert row["weights"] == "mixed" and row["predicted_kl"] == plan["predicted_kl"]
    assert sum(v["bytes"] for v in row["tensor_types"].values()) <= row["size_bytes"]
    assert "Tensor types of budget (chosen for ≤" in (out / "report.md").read_text()

    check_gptq_blocks_carried_under_the_budget(out, plan, budget_mb)
    gptq_row = next(r for r in report["variants"] if r["name"] == "gptq-budget")
    assert gptq_row["parameters"] == report["model"]["parameters"]


def check_gptq_blocks_carried_under_the_budget(out, plan, budget_mb):
    """GPTQ under the same budget solves each decoder linear onto the type the plan gives
    it (several grids in one checkpoint) and the file stores those integers as they are."""
    import gguf
    import numpy as np

    from edgellm.gptq_checkpoint import dequantized_state, read_plan_imatrix

    path = out / "gptq-budget" / "model.gguf"
    carried = json.loads((out / "gptq-budget" / "allocation.json").read_text())
    assert carried["tensor_types"] == plan["tensor_types"]  # planned on the same float model
    assert path.stat().st_size <= budget_mb * 1e6
    # every planned matrix is on a grid GPTQ solves onto: the decoder's and the tied
    # embedding, solved as the lm_head on the final norm's outputs
    assert "token_embd.weight" in plan["tensor_types"]
    assert carried["gptq_tensors"] == len(plan["tensor_types"])
    (step,) = [p for p in (out / "_work" / "steps").glob("gptq-*") if p.suffix != ".resume"]
    state = dequantized_state(step)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    # no name read off edgellm's folders (dequantized-<key> once gave basename "dequantized")
    assert "general.basename" not in reader.fields and "general.finetune" not in reader.fields
    pairs = {f"blk.{layer}.ffn_down.weight": f"model.layers.{layer}.mlp.down_proj.weight"
             for layer in range(2)}
    for gguf_name, hf_name in {**pairs, "token_embd.weight": "model.embed_tokens.weight"}.items():
        stored = tensors[gguf_name]
        assert stored.tensor_type.name == plan["tensor_types"][stored.name]
        values = gguf.quants.dequantize(np.asarray(stored.data), stored.tensor_type)
        solved = state[hf_name].numpy()
        assert np.array_equal(values.reshape(solved.shape), solved)
    config = json.loads((step / "config.json").read_text())["quantization_config"]
    assert config["edgellm_grid"] == "mixed"
    assert config["edgellm_tensor_types"]["tensor_types"] == plan["tensor_types"]
    # llama.cpp rounds what GPTQ left with the matrix the plan was priced with (the float
    # model's, carried by the checkpoint), not one recomputed on the solved model
    (priced,) = (out / "_work").glob("ref-*/imatrix-*.npz")
    matrix = read_plan_imatrix(step)
    with np.load(priced) as stored:
        assert sorted(matrix) == sorted(stored.files)
        assert all(np.array_equal(matrix[name], stored[name]) for name in stored.files)
    assert priced.parent.name != f"ref-{step.name.removeprefix('gptq-')}"


def test_gptq_under_a_budget_takes_its_grids_from_the_budget(tmp_path, tiny_llama):
    recipe = write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama, """
[[variant]]
name = "b"
compress = [{ method = "gptq", bits = 4 }]
export = { format = "gguf", max_size_mb = 10 }
""")
    result = run_cli("run", recipe, "--out", tmp_path / "out")
    assert result.returncode == 2 and "leave bits, group_size and backend out" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gptq_under_a_budget_solves_an_untied_lm_head_into_the_file(tmp_path):
    """Without tied embeddings the logits' matrix is lm_head: GPTQ solves it on the final
    norm's outputs and stores it as integers only (no float copy), and the GGUF's output
    tensor holds those very values."""
    import gguf
    import numpy as np
    from conftest import build_tiny_llama, load_tensors

    from edgellm.gptq_checkpoint import dequantized_state

    model = build_tiny_llama(tmp_path / "untied", tie=False)
    recipe = write_tiny_recipe(tmp_path / "recipe.toml", model, """
[[variant]]
name = "b"
compress = [{ method = "gptq" }]
export = { format = "gguf", target_bpw = 8.4, candidates = ["q5_0", "q8_0"] }
""")  # 8-bit storage: the tiny vocabulary (300) packs only 4 integers per checkpoint word
    out = tmp_path / "out"
    result = run_cli("run", recipe, "--out", out)
    assert result.returncode == 0, result.stderr
    plan = json.loads((out / "b" / "allocation.json").read_text())
    assert {"output.weight", "token_embd.weight"} <= set(plan["tensor_types"])
    assert plan["gptq_tensors"] == len(plan["tensor_types"]) - 1  # all but the lookup table
    (step,) = [p for p in (out / "_work" / "steps").glob("gptq-*") if p.suffix != ".resume"]
    stored = load_tensors(step)
    assert "lm_head.qweight" in stored and "lm_head.weight" not in stored
    assert "model.embed_tokens.qweight" not in stored  # the lookup alone: nothing to solve
    output = next(t for t in gguf.GGUFReader(out / "b" / "model.gguf").tensors
                  if t.name == "output.weight")
    values = gguf.quants.dequantize(np.asarray(output.data), output.tensor_type)
    solved = dequantized_state(step)["lm_head.weight"].numpy()
    assert np.array_equal(values.reshape(solved.shape), solved)
    row = json.loads((out / "report.json").read_text())["variants"][-1]
    assert row["parameters"] == json.loads((out / "report.json").read_text())["model"]["parameters"]
