"""GPTQ: the solver beats round-to-nearest on the same grid, checkpoints pack and unpack
exactly, and the GGUF exporter stores the solver's integers bit for bit."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import gptq_folder, run_cli, write_tiny_recipe

from edgellm.compress.solver import Hessian, block_gram, gptq_quantize, refit_scales
from edgellm.gptq_checkpoint import (
    PackedLinear,
    dequantized_state,
    from_checkpoint,
    pack_rows,
    to_checkpoint,
    unpack_rows,
)
from edgellm.grids import Q4_0 as Q4_0Grid
from edgellm.grids import Q8_0, Grid, NBits, dequantize

Q4_0 = Q4_0Grid()


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_rows_round_trips(bits):
    values = np.random.default_rng(0).integers(0, 1 << bits, size=(64, 24))
    packed = pack_rows(values, bits)
    assert packed.dtype == np.int32 and packed.shape == (64 * bits // 32, 24)
    assert np.array_equal(unpack_rows(packed, bits), values)


def test_checkpoint_round_trips_zero_points_including_zero():
    rng = np.random.default_rng(1)
    q = torch.from_numpy(rng.integers(0, 16, size=(16, 64))).float()
    zero = torch.from_numpy(rng.integers(0, 16, size=(16, 2))).float()
    zero[0, 0] = 0  # stored as -1: wraps to 15 in the v1 format
    scale = torch.rand(16, 2).half().float()
    linear = PackedLinear(q, scale, zero, 4, 32)
    back = from_checkpoint(to_checkpoint(linear), 4, 32, "t")
    assert torch.equal(back.q, q) and torch.equal(back.zero, zero) and torch.equal(back.scale, scale)


def _correlated_problem(rows=48, cols=128, samples=2048, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(samples, cols, generator=gen) @ mix + 0.1 * torch.randn(samples, cols, generator=gen)
    x[:, :4] *= 20  # a few outlier inputs, as real activations have
    w = torch.randn(rows, cols, generator=gen)
    hessian = Hessian(cols)
    hessian.add(x)
    return w, x, hessian.matrix()


def _rtn(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    blocks = w.reshape(w.shape[0], -1, grid.group)
    out = torch.empty_like(blocks)
    for g in range(blocks.shape[1]):
        scale, zero = grid.fit(blocks[:, g])
        out[:, g] = grid.value(grid.quantize(blocks[:, g], scale, zero), scale[:, None], zero[:, None])
    return out.reshape(w.shape)


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("grid", [Q4_0, NBits(4, 32, False), Q8_0()],
                         ids=lambda g: g.label)
def test_gptq_output_error_beats_round_to_nearest_on_the_same_grid(grid, act_order):
    w, x, H = _correlated_problem()
    q, scale, zero = gptq_quantize(w, H, grid, act_order=act_order)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax and torch.equal(q, q.round())
    assert torch.equal(scale, scale.half().float())  # scales as the file stores them
    solved = dequantize(grid, q, scale, zero)
    gptq_error = ((x @ (solved - w).T) ** 2).mean()
    rtn_error = ((x @ (_rtn(w, grid) - w).T) ** 2).mean()
    assert gptq_error < 0.8 * rtn_error


def test_block_gram_is_each_rows_block_matrix_through_the_hessian():
    gen = torch.Generator().manual_seed(1)
    V, H = torch.randn(5, 64, generator=gen), torch.randn(64, 64, generator=gen)
    gram = block_gram(V, H, 32, chunk_elems=64 * 2 * 2)  # two rows per chunk
    for r in range(5):
        Vr = torch.zeros(64, 2)
        Vr[:32, 0], Vr[32:, 1] = V[r, :32], V[r, 32:]
        torch.testing.assert_close(gram[r], Vr.T @ H @ Vr, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("grid", [Q4_0, NBits(4, 32, False), Q8_0()], ids=lambda g: g.label)
def test_refitted_scales_lower_the_output_error_row_by_row(grid):
    w, x, H = _correlated_problem()
    q, scale, zero = gptq_quantize(w, H, grid, refit=False)
    refitted = refit_scales(w, H, grid, q, scale, zero)
    assert torch.equal(refitted, refitted.half().float())  # scales as the file stores them

    def row_errors(s):
        return ((x @ (dequantize(grid, q, s, zero) - w).T) ** 2).mean(dim=0)

    before, after = row_errors(scale), row_errors(refitted)
    assert bool((after <= before * 1.001).all())  # a row never gets worse (damping aside)
    assert after.sum() < 0.97 * before.sum()


def test_gptq_with_refitted_scales_beats_plain_gptq_on_q4_0():
    w, x, H = _correlated_problem(seed=3)
    errors = []
    for refit in (False, True):
        solved = dequantize(Q4_0, *gptq_quantize(w, H, Q4_0, refit=refit))
        errors.append(((x @ (solved - w).T) ** 2).mean())
    assert errors[1] < 0.97 * errors[0]


def test_gptq_folder_is_a_standard_checkpoint(tiny_gptq):
    import json

    from safetensors.torch import load_file

    config = json.loads((tiny_gptq / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "gptq" and quant["bits"] == 4 and quant["group_size"] == 32
    tensors = {}
    for path in tiny_gptq.glob("*.safetensors"):
        tensors.update(load_file(path))
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].dtype == torch.int32
    assert tensors["model.layers.1.mlp.down_proj.g_idx"].shape == (128,)
    assert "model.layers.0.self_attn.q_proj.weight" not in tensors
    assert "model.embed_tokens.weight" in tensors  # tied embedding left in float


def test_gptq_model_runs_in_torch_close_to_the_original(tiny_llama, tiny_gptq):
    from edgellm.models import load_folder_model

    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        original = load_folder_model(tiny_llama)(ids).logits
        quantized = load_folder_model(tiny_gptq)(ids).logits
    assert not torch.equal(original, quantized)
    # a random tiny model amplifies 4-bit noise; quality is judged on SmolLM2 (e2e test)
    assert torch.nn.functional.cosine_similarity(original.flatten(), quantized.flatten(), dim=0) > 0.75


@pytest.mark.parametrize("weights", ["q4_0", "q5_0", "q8_0"])
def test_gguf_blocks_hold_the_solvers_weights_bit_for_bit(tiny_llama, tmp_path, weights):
    import gguf

    from edgellm.export.gguf import export_gguf

    tiny_gptq = gptq_folder(tiny_llama, tmp_path, grid=weights)
    path = export_gguf(tiny_gptq, tmp_path / "model.gguf", weights, tmp_path)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    solved = dequantized_state(tiny_gptq)
    checked = 0
    for layer in range(2):
        for hf, name, permute in [("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                                  ("self_attn.v_proj", "attn_v", 0), ("mlp.down_proj", "ffn_down", 0)]:
            tensor = tensors[f"blk.{layer}.{name}.weight"]
            assert tensor.tensor_type == gguf.GGMLQuantizationType[weights.upper()]
            stored = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            expected = solved[f"model.layers.{layer}.{hf}.weight"].numpy()
            if permute:  # llama.cpp's converter reorders q/k rows (rope pairs): same rows
                assert sorted(r.tobytes() for r in stored) == \
                    sorted(r.tobytes() for r in expected), tensor.name
            else:
                assert np.array_equal(stored, expected), tensor.name
            checked += 1
    assert checked == 8
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


def test_gguf_from_gptq_scores_like_torch(tiny_gptq, tmp_path):
    from edgellm.export.gguf import export_gguf
    from edgellm.runtimes import open_runtime, window_nll

    path = export_gguf(tiny_gptq, tmp_path / "model.gguf", "q4_0", tmp_path)
    window = np.arange(3, 120) % 290
    torch_nll, n = window_nll(open_runtime("torch", str(tiny_gptq), 1, 128), window)
    gguf_nll, m = window_nll(open_runtime("gguf", str(path), 1, 128), window)
    assert n == m
    # llama.cpp multiplies Q4_0 by 8-bit-quantized activations: close, not equal
    assert abs(gguf_nll / n - torch_nll / n) < 0.05 * abs(torch_nll / n)


def test_missing_checkpoint_tensor_is_one_line_exit_2(tiny_gptq, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_gptq, broken)
    for path in broken.glob("*.safetensors"):
        tensors = load_file(path)
        tensors.pop("model.layers.1.mlp.up_proj.scales", None)
        save_file(tensors, path, metadata={"format": "pt"})
    result = run_cli("export", broken, "--to", "gguf", "--weights", "q4_0", "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "up_proj.scales" in lines[0]


@pytest.mark.parametrize("setting, message", [
    ("bits=3", "bits"),
    ("group_size=48", "group_size"),
    ("group_size=256", "does not divide"),
])
def test_bad_gptq_options_are_one_line_exit_2(tiny_llama, tmp_path, setting, message):
    result = run_cli("compress", tiny_llama, "--method", "gptq", "--set", setting,
                     "--samples", "2", "--seqlen", "32", "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_calibration_too_short_is_one_line_exit_2(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words of calibration text here\n")
    result = run_cli("compress", tiny_llama, "--method", "gptq", "--calibration", short,
                     "--samples", "8", "--seqlen", "64", "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "short.txt" in lines[0] and "tokens" in lines[0], lines


def test_grid_of_a_recipe_export_is_the_exports():
    from edgellm.compress.gptq import Options, grid_of
    from edgellm.recipe import ExportSpec

    context = SimpleNamespace(export=ExportSpec(format="onnx", weights="int4", block_size=64))
    assert grid_of(Options(), context).label == "nbits4-g64-asym"
    context = SimpleNamespace(export=ExportSpec(format="gguf", weights="q4_0"))
    assert grid_of(Options(), context).label == "q4_0"


def _matmulnbits_weights(path, prefix: str) -> np.ndarray:
    """Dequantize one 4-bit MatMulNBits node's weights [N, K] as ONNX Runtime does:
    (q − zero)·scale, two values per byte (low nibble first), zero points packed likewise."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    qweight = inits[f"{prefix}.MatMulNBits.qweight"]  # [N, blocks, 16]
    n, blocks, _ = qweight.shape
    q = np.stack([qweight & 0xF, qweight >> 4], axis=-1).reshape(n, blocks, 32).astype(np.float32)
    zeros = inits[f"{prefix}.MatMulNBits.qzeros"].reshape(n, -1)
    zeros = np.stack([zeros & 0xF, zeros >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    scales = inits[f"{prefix}.MatMulNBits.scales"].reshape(n, blocks, 1).astype(np.float32)
    return ((q - zeros[..., None].astype(np.float32)) * scales).reshape(n, blocks * 32)


def test_onnx_matmulnbits_hold_the_solvers_weights_bit_for_bit(tiny_llama, tmp_path):
    from edgellm.export.onnx import export_onnx
    from edgellm.recipe import ExportSpec

    folder = gptq_folder(tiny_llama, tmp_path, grid="nbits", symmetric=False)
    work = tmp_path / "work"
    work.mkdir()
    target = export_onnx(folder, tmp_path / "onnx", ExportSpec(format="onnx", weights="int4"), work)
    solved = dequantized_state(folder)
    for layer in range(2):
        hf = f"model.layers.{layer}"
        qkv = np.concatenate([solved[f"{hf}.self_attn.{p}_proj.weight"].numpy() for p in "qkv"])
        assert np.array_equal(_matmulnbits_weights(target / "model.onnx", f"{hf}.attn.qkv_proj"), qkv)
        for part in ("mlp.down_proj", "mlp.gate_proj", "attn.o_proj"):
            hf_part = part.replace("attn.", "self_attn.")
            stored = _matmulnbits_weights(target / "model.onnx", f"{hf}.{part}")
            assert np.array_equal(stored, solved[f"{hf}.{hf_part}.weight"].numpy()), part


def _recipe(tmp_path, tiny_llama, variants: str):
    return write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama, variants)


def test_recipe_variants_on_the_same_grid_share_one_gptq_run(tiny_llama, tmp_path):
    import json

    recipe = _recipe(tmp_path, tiny_llama, """
[[variant]]
name = "gptq-gguf"
compress = [{ method = "gptq", bits = 4, group_size = 32 }]
export = { format = "gguf", weights = "q4_0" }
[[variant]]
name = "gptq-onnx"
compress = [{ method = "gptq" }]
export = { format = "onnx", weights = "int4", symmetric = true }
""")
    out = tmp_path / "out"
    result = run_cli("run", recipe, "--out", out)
    assert result.returncode == 0, result.stderr
    assert len(list((out / "_work" / "steps").iterdir())) == 1
    rows = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    assert rows["gptq-gguf"]["steps"] == ["gptq"] == rows["gptq-onnx"]["steps"]
    # the same integers in both files: the two runtimes agree closely
    assert abs(rows["gptq-gguf"]["ppl"] - rows["gptq-onnx"]["ppl"]) < 0.03 * rows["gptq-gguf"]["ppl"]


def test_gptq_onto_an_export_without_a_grid_is_refused_before_any_work(tiny_llama, tmp_path):
    recipe = _recipe(tmp_path, tiny_llama, """
[[variant]]
name = "gptq-kquant"
compress = [{ method = "gptq" }]
export = { format = "gguf", weights = "q4_k_m" }
""")
    out = tmp_path / "out"
    result = run_cli("run", recipe, "--out", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gptq-kquant" in lines[0] and "q4_k_m" in lines[0], lines
    assert not out.exists()


def test_transformers_recognises_the_checkpoints_quantization_config(tiny_gptq):
    """transformers turns the config into its GPTQConfig (loading the weights also needs
    GPTQModel's kernels, not installed here): bits, groups and symmetry as written."""
    import json

    from transformers import GPTQConfig
    from transformers.quantizers.auto import AutoQuantizationConfig

    quant = json.loads((tiny_gptq / "config.json").read_text())["quantization_config"]
    parsed = AutoQuantizationConfig.from_dict(dict(quant))
    assert isinstance(parsed, GPTQConfig)
    assert (parsed.bits, parsed.group_size, parsed.sym, parsed.desc_act) == (4, 32, True, False)


def test_a_checkpoint_with_4_and_8_bit_linears_counts_its_own_parameters(tmp_path):
    """Each packed linear's inputs are read from its g_idx, not from the checkpoint's
    base bits (a budget's GPTQ checkpoint once reported 6.42 bpw for a 5.45 bpw file)."""
    import json

    from safetensors.torch import save_file

    from edgellm.artifact_stats import model_stats

    rows, cols = 16, 64
    tensors = {"embed.weight": torch.zeros(10, 4)}
    for name, bits in (("a", 4), ("b", 8)):
        tensors[f"{name}.qweight"] = torch.zeros(cols * bits // 32, rows, dtype=torch.int32)
        tensors[f"{name}.qzeros"] = torch.zeros(cols // 32, rows * bits // 32, dtype=torch.int32)
        tensors[f"{name}.scales"] = torch.zeros(cols // 32, rows, dtype=torch.float16)
        tensors[f"{name}.g_idx"] = torch.zeros(cols, dtype=torch.int32)
    save_file(tensors, tmp_path / "model.safetensors")
    config = {"quantization_config": {"quant_method": "gptq", "bits": 8}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_stats(tmp_path)["parameters"] == 40 + 2 * rows * cols


def test_the_scale_refit_is_on_by_default_for_4_bit_grids_only():
    from edgellm.compress.gptq import Options, refit_for
    from edgellm.grids import Q5_0

    assert refit_for(Options(), Q4_0) and refit_for(Options(), NBits(4, 32, False))
    assert not refit_for(Options(), Q5_0()) and not refit_for(Options(), Q8_0())
    assert refit_for(Options(refit=True), Q5_0()) and not refit_for(Options(refit=False), Q4_0)


def test_true_sequential_solves_each_group_on_the_solved_groups_outputs(tiny_llama, tmp_path):
    """With true_sequential, q/k/v are solved as in one pass (the same Hessian: nothing
    before them changed) but o_proj onto what the solved q/k/v attend, so its integers
    differ; without it every group uses the Hessians of one pass."""
    from conftest import shared_text

    from edgellm.compress.calibration import calibration_ids
    from edgellm.compress.gptq import Options, quantize_layer
    from edgellm.compress.layerwise import stream_layers

    solved = {}

    def process_for(options):
        def process(index, layer, inputs):
            before = {k: v.clone() for k, v in layer.state_dict().items()}
            for sequential in (False, True):
                layer.load_state_dict(before)
                stored = quantize_layer(layer, inputs, lambda _name: NBits(4, 32, False),
                                        options.model_copy(update={"true_sequential": sequential}),
                                        f"model.layers.{index}")
                solved[(index, sequential)] = {k: v.clone() for k, v in stored.items()}
            return solved[(index, False)]
        return process

    ids = calibration_ids(tiny_llama, str(shared_text("wikitext-2-valid.txt")), 2, 32)
    (tmp_path / "out").mkdir()
    stream_layers(tiny_llama, tmp_path / "out", ids, process_for(Options(awq=False)))
    one_pass, sequential = solved[(0, False)], solved[(0, True)]
    assert torch.equal(one_pass["self_attn.q_proj.qweight"], sequential["self_attn.q_proj.qweight"])
    assert not torch.equal(one_pass["self_attn.o_proj.qweight"], sequential["self_attn.o_proj.qweight"])
