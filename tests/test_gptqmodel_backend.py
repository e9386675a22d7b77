"""The optional GPTQModel backend, as far as a CPU machine without GPTQModel allows: its
refusals, the QuantizeConfig it asks for, and the read-back of the checkpoint it leaves
(here one in the same v1 layout, written by the native solver)."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli, write_tiny_recipe
from safetensors.torch import load_file, save_file

from edgellm.compress import gptqmodel_backend
from edgellm.errors import UserError
from edgellm.grids import NBits, gguf_grid

OPTIONS = SimpleNamespace(act_order=True, damp=0.01, true_sequential=False)


def test_without_gptqmodel_or_cuda_the_backend_is_one_line_exit_2(tiny_llama, tmp_path):
    result = run_cli("compress", tiny_llama, "--method", "gptq", "--set", "backend=gptqmodel",
                     "--samples", "2", "--seqlen", "32", "--out", tmp_path / "o")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gptqmodel" in lines[0] and "backend" in lines[0], lines


def test_a_grid_gptqmodel_lacks_is_refused_before_any_work(tiny_llama, tmp_path):
    recipe = write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama, """
[[variant]]
name = "gpu-q5"
compress = [{ method = "gptq", backend = "gptqmodel" }]
export = { format = "gguf", weights = "q5_0" }
""")
    result = run_cli("run", recipe, "--out", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpu-q5" in lines[0] and "q5_0" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_quantize_config_asks_for_the_exports_grid_with_contiguous_groups():
    q4_0 = gptqmodel_backend.quantize_config_kwargs(gguf_grid("q4_0"), OPTIONS)
    assert q4_0 == {"bits": 4, "group_size": 32, "sym": True, "desc_act": False,
                    "static_groups": True, "damp_percent": 0.01, "true_sequential": False,
                    "format": "gptq"}
    int8 = gptqmodel_backend.quantize_config_kwargs(NBits(8, 128, False), OPTIONS)
    assert (int8["bits"], int8["group_size"], int8["sym"]) == (8, 128, False)
    with pytest.raises(UserError, match="q8_0"):
        gptqmodel_backend.quantize_config_kwargs(gguf_grid("q8_0"), OPTIONS)


def test_calibration_rows_are_the_same_windows():
    ids = torch.arange(12).reshape(3, 4)
    rows = gptqmodel_backend.calibration_rows(ids)
    assert [r["input_ids"] for r in rows] == ids.tolist()
    assert all(r["attention_mask"] == [1, 1, 1, 1] for r in rows)


def _as_if_from_gptqmodel(tiny_gptq, tmp_path):
    """A v1 checkpoint as another tool leaves it: no edgellm_grid, no tokenizer files."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_gptq, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]["edgellm_grid"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_finished_checkpoint_names_its_grid_and_carries_the_tokenizer(tiny_llama, tiny_gptq, tmp_path):
    folder = _as_if_from_gptqmodel(tiny_gptq, tmp_path)
    gptqmodel_backend.finish_checkpoint(tiny_llama, folder, gguf_grid("q4_0"))
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["edgellm_grid"] == "q4_0"
    assert (folder / "tokenizer.json").is_file()


def test_a_checkpoint_edgellm_cannot_read_fails_at_once(tiny_llama, tiny_gptq, tmp_path):
    folder = _as_if_from_gptqmodel(tiny_gptq, tmp_path)
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        tensors.pop("model.layers.0.self_attn.k_proj.qzeros", None)
        save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match="k_proj.qzeros"):
        gptqmodel_backend.finish_checkpoint(tiny_llama, folder, gguf_grid("q4_0"))
