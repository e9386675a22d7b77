"""MLX export (mlx-lm folder) and the MLX runtime, checked here with mlx[cpu] on Linux."""

import json

import pytest
from conftest import run_cli, write_tiny_recipe

VARIANTS = """
[[variant]]
name = "mlx-f16"
export = { format = "mlx", weights = "f16" }
[[variant]]
name = "mlx-q8"
export = { format = "mlx", weights = "q8" }
[[variant]]
name = "mlx-q4"
export = { format = "mlx", weights = "q4" }
"""


@pytest.fixture(scope="module")
def mlx_run(tmp_path_factory, tiny_llama):
    folder = tmp_path_factory.mktemp("mlx")
    recipe = write_tiny_recipe(folder / "recipe.toml", tiny_llama, VARIANTS)
    result = run_cli("run", recipe, "--out", folder / "out")
    assert result.returncode == 0, result.stderr
    report = json.loads((folder / "out" / "report.json").read_text())
    return folder / "out", {v["name"]: v for v in report["variants"]}


def test_f16_matches_torch_and_quantized_types_are_smaller(mlx_run):
    _, rows = mlx_run
    assert rows["mlx-f16"]["runtime"] == "mlx"
    assert abs(rows["mlx-f16"]["ppl_delta_pct"]) < 0.5
    assert rows["mlx-q4"]["size_bytes"] < rows["mlx-q8"]["size_bytes"] < rows["mlx-f16"]["size_bytes"]
    assert rows["mlx-f16"]["kl_mean"] < rows["mlx-q8"]["kl_mean"] < rows["mlx-q4"]["kl_mean"]
    assert rows["mlx-f16"]["greedy_tokens"] == rows["reference"]["greedy_tokens"]
    assert rows["mlx-q4"]["decode_tps"] > 0


def test_the_folder_is_what_mlx_lm_reads(mlx_run):
    out, rows = mlx_run
    folder = out / rows["mlx-q4"]["path"]
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    assert config["edgellm_export"] == {"format": "mlx", "weights": "q4", "group_size": 64}
    assert (folder / "tokenizer.json").is_file() and not (folder / "README.md").exists()
    from mlx_lm import load

    model, tokenizer = load(str(folder))
    assert tokenizer.encode("hello") and model.layers


def test_export_and_eval_from_the_command_line(tmp_path, tiny_llama):
    result = run_cli("export", tiny_llama, "--to", "mlx", "--weights", "q8", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "tiny-llama-q8-mlx"
    evaluated = run_cli("eval", folder, "--ctx", 64, "--max-tokens", 256, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["runtime"] == "mlx"
    bad = run_cli("export", tiny_llama, "--to", "mlx", "--weights", "q3", "--out", tmp_path / "x")
    assert bad.returncode == 2 and "weights 'q3' not available for mlx" in bad.stderr


def test_rope_theta_survives_the_export(tmp_path, tiny_llama):
    """mlx-lm reads only the pre-transformers-5 `rope_theta` key: a model whose theta is
    not mlx-lm's default must still score like torch."""
    import shutil

    model = shutil.copytree(tiny_llama, tmp_path / "theta")
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 100000.0
    (model / "config.json").write_text(json.dumps(config))
    assert run_cli("export", model, "--to", "mlx", "--out", tmp_path).returncode == 0
    exported = json.loads((tmp_path / "theta-f16-mlx" / "config.json").read_text())
    assert exported["rope_theta"] == 100000.0

    def ppl(path):
        result = run_cli("eval", path, "--ctx", 64, "--max-tokens", 512, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["ppl"]

    assert ppl(tmp_path / "theta-f16-mlx") == pytest.approx(ppl(model), rel=0.005)
