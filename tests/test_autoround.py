"""AutoRound onto the export's grid (compress/autoround.py): the integers it tuned are the
ones the MLX folder, the GGUF blocks and the MatMulNBits nodes hold, it tunes rather than
rounds, under a size budget it takes the plan's grids and the logits' matrix is solved
too, and grids it cannot compute exactly are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_tensors, run_cli, shared_text, write_tiny_recipe

from edgellm.export.gguf_gptq import packed_linears
from edgellm.gptq_checkpoint import dequantized_state


def step_folder(out):
    (step,) = [p for p in (out / "_work" / "steps").glob("autoround-*") if p.suffix != ".resume"]
    return step


def run_variant(tmp_path, tiny_llama, export: str, step: str = '{ method = "autoround", iters = 4 }'):
    recipe = write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama, f"""
[[variant]]
name = "v"
compress = [{step}]
export = {export}
""")
    out = tmp_path / "out"
    return run_cli("run", recipe, "--out", out), out


def test_autoround_integers_are_carried_into_mlx_and_are_tuned(tmp_path, tiny_llama):
    import mlx.core as mx
    import torch

    from edgellm.grids import NBits

    result, out = run_variant(tmp_path, tiny_llama, '{ format = "mlx", weights = "q4" }')
    assert result.returncode == 0, result.stderr
    step = step_folder(out)
    config = json.loads((step / "config.json").read_text())["quantization_config"]
    assert config["edgellm_grid"] == "nbits4-g64-asym" and config["autoround"]["iters"] == 4
    linears, solved = packed_linears(step), dequantized_state(step)
    stored = {k: mx.array(v) for k, v in load_tensors_np(out / "v" / "mlx").items()}
    assert len(linears) == 14  # 2 layers × 7 linears
    source, grid, moved = load_tensors(tiny_llama), NBits(4, 64, False), 0
    for name, linear in linears.items():
        q, scales, biases = (stored[f"{name}.{p}"] for p in ("weight", "scales", "biases"))
        values = np.array(mx.dequantize(q, scales, biases, group_size=64, bits=4).astype(mx.float32))
        expected = solved[f"{name}.weight"].numpy()
        step_size = np.repeat(linear.scale.float().numpy(), 64, axis=1)
        assert np.array_equal(np.round((values - expected) / step_size), np.zeros_like(values))
        weight = source[f"{name}.weight"].float()
        blocks = weight.reshape(-1, 64)
        scale, zero = grid.fit_range(blocks)
        nearest = grid.value(grid.quantize(blocks, scale, zero), scale[:, None], zero[:, None])
        moved += int((nearest.reshape(weight.shape) != torch.from_numpy(expected)).sum())
    assert moved > 0  # tuned: not the grid's round-to-nearest at full range


def test_block_progress_follows_the_blocks_the_library_tunes(tiny_llama):
    import torch
    from rich.console import Console
    from rich.progress import Progress

    from edgellm.compress.autoround import block_progress, load_float

    model, seen = load_float(tiny_llama), []
    with Progress(console=Console(quiet=True)) as progress:
        with block_progress(model.model.layers, progress):
            model.model.layers[1].mlp.register_forward_hook(
                lambda *_: seen.append(progress.tasks[0].description))
            model(input_ids=torch.tensor([[1, 2, 3]]))
        assert seen == ["autoround block 2/2"]
        assert progress.tasks[0].completed == 2
    assert not model.model.layers[0]._forward_pre_hooks


def test_autoround_onto_q4_0_is_stored_in_the_gguf_blocks(tmp_path, tiny_llama):
    import gguf

    result, out = run_variant(tmp_path, tiny_llama, '{ format = "gguf", weights = "q4_0" }')
    assert result.returncode == 0, result.stderr
    solved = dequantized_state(step_folder(out))
    (path,) = (out / "v").glob("*.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for layer in range(2):
        tensor = tensors[f"blk.{layer}.ffn_down.weight"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0
        stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(stored, solved[f"model.layers.{layer}.mlp.down_proj.weight"].numpy())


def test_autoround_inside_an_mlx_budget_takes_the_plan_and_solves_the_head(tmp_path, tiny_llama):
    from edgellm.export.mlx_gptq import mlx_tensors

    result, out = run_variant(tmp_path, tiny_llama, '{ format = "mlx", target_bpw = 6, '
                              'candidates = ["q3-g32", "q5-g64", "q8-g64"] }')
    assert result.returncode == 0, result.stderr
    plan = json.loads((out / "v" / "allocation.json").read_text())
    # every matrix but the 8-bit ones (AutoRound leaves them to the exporter), the embedding
    # solved by GPTQ as the lm_head
    eight = sum(c.startswith("q8") for c in plan["tensor_types"].values())
    assert plan["gptq_tensors"] == len(plan["tensor_types"]) - eight
    assert plan["written_bytes"] <= plan["max_size_mb"] * 1e6
    widths = {name: int(c[1]) for name, c in plan["tensor_types"].items()}
    assert set(widths.values()) - {4, 8}
    stored = load_tensors_np(out / "v" / "mlx")
    linears = packed_linears(step_folder(out))
    assert "model.embed_tokens" in linears
    for name, linear in linears.items():
        assert not plan["tensor_types"][f"{name}.weight"].startswith("q8")
        for part, value in mlx_tensors(linear, widths[f"{name}.weight"]).items():
            assert np.array_equal(stored[f"{name}.{part}"], value), (name, part)


def load_tensors_np(folder):
    from safetensors.numpy import load_file

    stored = {}
    for path in folder.glob("*.safetensors"):
        stored.update(load_file(path))
    return stored


@pytest.mark.parametrize("export, step, message", [
    ('{ format = "gguf", weights = "q8_0" }', '{ method = "autoround" }', "q8_0"),
    ('{ format = "mlx", weights = "q8" }', '{ method = "autoround" }', "nbits8-g64-asym"),
    ('{ format = "mlx", max_size_mb = 1 }', '{ method = "autoround", bits = 4 }', "leave bits"),
    ('{ format = "gguf", weights = "q4_k_m" }', '{ method = "autoround" }', "q4_k_m"),
])
def test_bad_autoround_steps_are_one_line_before_any_work(tmp_path, tiny_llama, export, step,
                                                           message):
    result, out = run_variant(tmp_path, tiny_llama, export, step)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not out.exists()


def test_a_group_that_does_not_divide_is_one_line_before_tuning(tiny_llama, tmp_path):
    result = run_cli("compress", tiny_llama, "--method", "autoround", "--set", "group_size=256",
                     "--samples", "2", "--seqlen", "32", "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not divide" in lines[0], lines
    assert not list((tmp_path / "o").rglob("*.safetensors"))


def test_autoround_onto_int4_is_stored_in_the_matmulnbits_nodes(tmp_path, tiny_llama):
    from edgellm.compress import Context, apply_step
    from edgellm.export.onnx import export_onnx
    from edgellm.recipe import CalibrationSpec, ExportSpec
    from test_gptq import _matmulnbits_weights

    export = ExportSpec(format="onnx", weights="int4")  # zero points, blocks of 32
    folder, work = tmp_path / "autoround", tmp_path / "work"
    folder.mkdir(), work.mkdir()
    calibration = CalibrationSpec(text=str(shared_text("wikitext-2-valid.txt")), samples=4, seqlen=64)
    apply_step({"method": "autoround", "iters": 4}, tiny_llama, folder,
               Context(calibration=calibration, export=export))
    target = export_onnx(folder, tmp_path / "onnx", export, work)
    solved = dequantized_state(folder)
    for layer in range(2):
        hf = f"model.layers.{layer}"
        stored = _matmulnbits_weights(target / "model.onnx", f"{hf}.mlp.down_proj")
        assert np.array_equal(stored, solved[f"{hf}.mlp.down_proj.weight"].numpy())


def test_each_gemma3_block_is_tuned_on_its_own_rope(tmp_path):
    """The library replays block 0's inputs to every block; Gemma 3's full-attention layer
    has another rope (and mask) than its sliding layer 0, so it must get its own."""
    import torch
    from families import build_family

    from edgellm.compress import autoround
    from edgellm.compress.hessians import linear_layers
    from edgellm.grids import NBits

    folder = build_family("gemma3", tmp_path / "gemma3")
    model = autoround.load_float(folder)
    grids = {f"model.layers.{i}.{name}": NBits(4, 32, False)
             for i, layer in enumerate(model.model.layers) for name in linear_layers(layer)}
    kinds, matched = model.config.layer_types, []
    assert kinds == ["sliding_attention", "full_attention"]

    def check(kind):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            positions = torch.arange(hidden.shape[1])[None]
            cos = model.model.rotary_emb(hidden, positions, kind)[0]
            matched.append((kind, torch.allclose(kwargs["position_embeddings"][0].float(),
                                                 cos.float(), atol=1e-2)))
        return hook

    for layer, kind in zip(model.model.layers, kinds):
        layer.register_forward_pre_hook(check(kind), with_kwargs=True)
    ids = torch.randint(3, 200, (4, 64), generator=torch.Generator().manual_seed(0))
    autoround.tune(model, folder, ids, grids, autoround.Options(iters=2))
    assert {kind for kind, _ in matched} == set(kinds)  # both blocks were tuned
    assert all(ok for _, ok in matched), matched
