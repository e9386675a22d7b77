"""SmoothQuant keeps the model's function while flattening activation outliers, and the
torch int8 export runs torchao dynamic INT8 (int8 weights, int8 activations per token)."""

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


def test_torch_int8_export_quantizes_on_load_and_stays_close(tiny_llama, smoothed, tmp_path):
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
    assert abs(int8["ppl_delta_pct"]) < 5
    assert type(load_folder_model(out / "torch-int8").lm_head.weight).__name__ == "Parameter"
    model = load_folder_model(out / "torch-int8", runtime_quantization=True)
    assert type(model.model.layers[0].mlp.down_proj.weight).__name__ != "Parameter"  # torchao tensor
    assert type(model.lm_head.weight).__name__ == "Parameter"  # the lm_head stays float


def test_smoothquant_alpha_out_of_range_is_refused(tiny_llama, tmp_path):
    result = run_cli("compress", tiny_llama, "--method", "smoothquant", "--set", "alpha=1.5",
                     "--out", tmp_path / "o")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "alpha" in lines[0], lines
