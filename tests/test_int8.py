"""SmoothQuant keeps the model's function while flattening activation outliers, and the
torch int8 export stores int8 codes with per-row scales that the torch runtime computes with
as stored (fbgemm's dynamic INT8 linear for one token, the dequantized codes for several)."""

import json

import pytest
import torch
from conftest import run_cli, shared_text, write_tiny_recipe

from edgellm.compress import Context, apply_step
from edgellm.models import load_folder_model
from edgellm.recipe import CalibrationSpec

IDS = torch.arange(3, 70)[None]


@pytest.fixture(scope="module")
def outlier_llama(tiny_llama, tmp_path_factory):
    """The tiny model with one outlier activation channel, as trained LLMs have."""
    import shutil

    folder = tmp_path_factory.mktemp("outlier") / "model"
    shutil.copytree(tiny_llama, folder)
    model = load_folder_model(tiny_llama)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] *= 40
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def smoothed(outlier_llama, tmp_path_factory):
    dest = tmp_path_factory.mktemp("smooth") / "model"
    dest.mkdir()
    calibration = CalibrationSpec(text=str(shared_text("wikitext-2-valid.txt")), samples=4, seqlen=64)
    apply_step({"method": "smoothquant", "alpha": 0.5}, outlier_llama, dest, Context(calibration=calibration))
    return dest


def _norm_outputs(model):
    outputs = []
    handle = model.model.layers[0].input_layernorm.register_forward_hook(
        lambda _m, _i, out: outputs.append(out.detach().abs().amax(dim=(0, 1))))
    with torch.no_grad():
        logits = model(IDS).logits
    handle.remove()
    return logits, outputs[0]


def test_smoothquant_keeps_the_function_and_flattens_outlier_channels(outlier_llama, smoothed):
    original_logits, original_act = _norm_outputs(load_folder_model(outlier_llama))
    smooth_logits, smooth_act = _norm_outputs(load_folder_model(smoothed))
    assert torch.allclose(original_logits, smooth_logits, rtol=1e-3, atol=1e-3)

    def spread(act):
        return (act.max() / act.median()).item()

    assert spread(original_act) > 10
    assert spread(smooth_act) < spread(original_act) / 3


def test_torch_int8_export_stores_int8_and_runs_with_it(tiny_llama, smoothed, tmp_path):
    from safetensors import safe_open

    from edgellm.torch_int8 import Int8Embedding, Int8Linear

    recipe = write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama, """
[[variant]]
name = "torch-int8"
compress = [{ method = "smoothquant" }]
export = { format = "torch", weights = "int8" }
""")
    out = tmp_path / "out"
    result = run_cli("run", recipe, "--out", out)
    assert result.returncode == 0, result.stderr
    rows = {v["name"]: v for v in json.loads((out / "report.json").read_text())["variants"]}
    int8 = rows["torch-int8"]
    assert int8["weights"] == "int8" and int8["steps"] == ["smoothquant"] and int8["runtime"] == "torch"
    assert int8["ppl"] != rows["reference"]["ppl"]
    assert abs(int8["ppl_delta_pct"]) < 2
    # int8 on disk: the tied embedding once, every linear, a float32 scale per row
    assert int8["size_bytes"] < rows["reference"]["size_bytes"] / 3.5
    assert not (out / "torch-int8" / "model.safetensors").exists()
    with safe_open(out / "torch-int8" / "int8.safetensors", "pt") as stored:
        names = set(stored.keys())
        assert stored.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.int8
        assert stored.get_tensor("model.embed_tokens.weight").dtype == torch.int8
    assert "lm_head.weight" not in names and "model.embed_tokens.weight_scale" in names
    # each linear's inputs measured on the calibration text, the tied head's included
    assert {"lm_head.input_max", "model.layers.0.mlp.down_proj.input_max"} <= names
    assert "model.embed_tokens.input_max" not in names
    model = load_folder_model(out / "torch-int8", runtime_quantization=True)
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(model.model.embed_tokens, Int8Embedding)
    assert torch.equal(model.lm_head.codes_t.t(), model.model.embed_tokens.codes)  # tied
    float_model = load_folder_model(tiny_llama)
    dequantized = load_folder_model(out / "torch-int8")  # what compression steps read
    with torch.no_grad():
        reference, ours = float_model(IDS).logits, model(IDS).logits
        assert torch.allclose(dequantized(IDS).logits, ours, atol=1e-4)
    relative = ((reference - ours).norm() / reference.norm()).item()
    assert 0 < relative < 0.06, relative  # 0.04 on this tiny random model


def test_int8_decode_step_runs_the_integer_kernel_on_the_same_codes(tiny_llama, tmp_path):
    """One token goes through the dynamic INT8 kernel: the token's activations are rounded
    to 8 bits too (all but its largest channels), so it differs from the float path a
    little, and only a little."""
    from edgellm.torch_int8 import write_int8_folder

    folder = tmp_path / "int8"
    folder.mkdir()
    write_int8_folder(load_folder_model(tiny_llama), folder)
    layer = load_folder_model(folder, runtime_quantization=True).model.layers[0].mlp.down_proj
    assert layer.kernel is not None  # x86 (fbgemm) and ARM (qnnpack) builds have one
    x = torch.randn(1, 1, layer.in_features)
    with torch.no_grad():
        integer, floating = layer(x), torch.nn.functional.linear(x, layer.dequantized())
    assert not torch.equal(integer, floating)
    assert (integer - floating).abs().max() < 0.02 * floating.abs().max()


def test_plain_transformers_refuses_an_int8_folder_instead_of_misreading_it(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgellm.torch_int8 import write_int8_folder

    folder = tmp_path / "int8"
    folder.mkdir()
    write_int8_folder(load_folder_model(tiny_llama), folder)
    with pytest.raises(OSError, match="model.safetensors"):  # transformers 5 would ignore
        AutoModelForCausalLM.from_pretrained(folder)  # the unknown method, not the missing file


def test_smoothquant_alpha_out_of_range_is_refused(tiny_llama, tmp_path):
    result = run_cli("compress", tiny_llama, "--method", "smoothquant", "--set", "alpha=1.5",
                     "--out", tmp_path / "o")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "alpha" in lines[0], lines


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "phi3"])
def test_int8_folder_of_each_family_computes_like_its_float_model(family, tmp_path):
    """Qwen2's biased q/k/v, Gemma 3's scaled embedding and (1+w) norms, Phi-3's fused
    projections: the int8 modules stand in for each, and the dequantized load equals them."""
    from families import build_family

    from edgellm.torch_int8 import write_int8_folder

    source = build_family(family, tmp_path / "src")
    folder = tmp_path / "int8"
    folder.mkdir()
    write_int8_folder(load_folder_model(source), folder)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        reference = load_folder_model(source)(ids).logits
        ours = load_folder_model(folder, runtime_quantization=True)(ids).logits
        dequantized = load_folder_model(folder)(ids).logits
    assert torch.allclose(dequantized, ours, atol=1e-4)
    relative = ((reference - ours).norm() / reference.norm()).item()
    assert 0 < relative < 0.06, relative


def test_the_outlier_split_keeps_a_large_channel_exact(tiny_llama, tmp_path):
    """A token with one huge channel: through the kernel alone, that channel stretches the
    8-bit scale of all others; with the split (the default), it is multiplied in float."""
    from edgellm.torch_int8 import write_int8_folder

    folder = tmp_path / "int8"
    folder.mkdir()
    write_int8_folder(load_folder_model(tiny_llama), folder)
    layer = load_folder_model(folder, runtime_quantization=True).model.layers[0].mlp.down_proj
    x = torch.randn(1, 1, layer.in_features, generator=torch.Generator().manual_seed(0))
    x[..., 3] = 300.0
    assert_split_keeps_outliers(layer, x)


def assert_split_keeps_outliers(layer, x) -> None:
    """The layer's decode of token x, outliers split, lands far closer to the float product
    than the integer kernel alone does."""
    with torch.no_grad():
        floating = torch.nn.functional.linear(x, layer.dequantized())
        split = layer(x)
        layer.split_outliers = False
        kernel_only = layer(x)
    assert (split - floating).abs().max() < (kernel_only - floating).abs().max() / 4


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma3"])
def test_linears_reading_one_input_decode_through_one_kernel_with_the_same_result(family, tmp_path):
    """q/k/v and gate/up decode one token through one stacked kernel (one outlier choice
    for the shared input): the tokens decoded match each linear decoding on its own."""
    from families import build_family

    from edgellm import torch_int8

    source = build_family(family, tmp_path / "src")
    folder = tmp_path / "int8"
    folder.mkdir()
    torch_int8.write_int8_folder(load_folder_model(source), folder)
    shared = load_folder_model(folder, runtime_quantization=True)
    attention = shared.model.layers[0].self_attn
    assert attention.q_proj.shared is attention.k_proj.shared is attention.v_proj.shared
    assert attention.q_proj.shared is not None and attention.q_proj.kernel is None
    assert shared.model.layers[0].mlp.up_proj.shared is not None
    assert attention.o_proj.shared is None and attention.o_proj.kernel is not None

    def decode(model, steps=6):
        ids, past, logits = torch.arange(3, 12)[None], None, []
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            for _ in range(steps):
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                logits.append(out.logits[0, -1])
                out = model(input_ids=token, past_key_values=past, use_cache=True)
        return torch.stack(logits)

    apart = torch_int8.share_decode_inputs  # loaded again with every linear on its own
    torch_int8.share_decode_inputs = lambda model: 0
    try:
        separate = load_folder_model(folder, runtime_quantization=True)
    finally:
        torch_int8.share_decode_inputs = apart
    assert separate.model.layers[0].self_attn.q_proj.shared is None
    assert torch.allclose(decode(shared), decode(separate), atol=1e-5)


def test_decode_steps_use_all_8_bits_where_the_kernel_sums_them_exactly(tiny_llama, tmp_path):
    """`full_range_products` measures whether the kernel's 8-bit products overflow. Where
    they do not, tokens are rounded to 8 bits instead of 7 and land closer to the float
    product; where they do, the probe's exact answer is missed by far."""
    from edgellm import torch_int8

    codes, scale = torch_int8.quantize_rows(torch.randn(96, 64, generator=torch.Generator().manual_seed(1)))
    packed = torch_int8.pack_int8(codes, scale, None)
    tokens = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    exact = tokens @ (codes.float() * scale[:, None]).t()

    def error(reduce_range):
        rows = [torch.ops.quantized.linear_dynamic(t[None], packed, reduce_range=reduce_range)
                for t in tokens]
        return (torch.cat(rows) - exact).norm().item()

    if torch_int8.full_range_products():
        assert error(False) < 0.75 * error(True)
    else:
        probe = torch_int8.pack_int8(torch.full((8, 64), 127, dtype=torch.int8), torch.ones(8), None)
        y = torch.ops.quantized.linear_dynamic(torch.ones(1, 64), probe, reduce_range=False)
        assert (y - 127.0 * 64).abs().max() > 100


def test_fixed_outlier_channels_are_the_calibrations_largest(tiny_llama, tmp_path):
    """An int8 folder written with calibration windows stores each linear's largest input
    per channel; where tokens take all 8 bits, decode steps multiply the FIXED_OUTLIERS
    largest of them in float (one choice per shared input), and a token huge on those
    channels decodes almost as the float product does."""
    from edgellm import torch_int8

    model = load_folder_model(tiny_llama)
    folder = tmp_path / "int8"
    folder.mkdir()
    torch_int8.write_int8_folder(model, folder, [list(range(3, 60)), list(range(60, 120))])
    loaded = load_folder_model(folder, runtime_quantization=True)
    down = loaded.model.layers[0].mlp.down_proj
    assert down.input_max is not None and down.input_max.shape == (down.in_features,)
    assert loaded.lm_head.input_max is not None
    if not torch_int8.full_range_products():  # 7-bit tokens: outliers chosen per token
        assert down.kernel.fixed is None
        return
    channels, _ = down.kernel.fixed
    assert channels.tolist() == sorted(down.input_max.topk(torch_int8.FIXED_OUTLIERS).indices.tolist())
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.input_max is not None and q.decode_kernel.fixed is not None
    x = torch.randn(1, 1, down.in_features, generator=torch.Generator().manual_seed(0))
    x[..., channels] *= 300.0
    assert_split_keeps_outliers(down, x)
