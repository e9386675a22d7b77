"""GPTQ onto MLX's grid: the integers the solver chose are the ones in the MLX folder,
with float16 scales and biases = −zero·scale, and MLX computes the solved weights."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli, window_nll_of, write_tiny_recipe


def test_pack_words_is_mlx_layout():
    import mlx.core as mx

    from edgellm.export.mlx_gptq import pack_words

    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 5, 6, 8):  # 3, 5 and 6 bits straddle the uint32 words
        w = rng.normal(size=(8, 128)).astype(np.float16)
        q, scales, biases = mx.quantize(mx.array(w), group_size=64, bits=bits)
        values = np.array(mx.dequantize(q, scales, biases, group_size=64, bits=bits)).astype(np.float32)
        ints = np.round((values - np.repeat(np.array(biases, np.float32), 64, 1))
                        / np.repeat(np.array(scales, np.float32), 64, 1))
        assert len(np.unique(ints)) > 1 << (bits - 1)  # the grid's range, not a few values
        assert np.array_equal(pack_words(ints.astype(np.uint32), bits), np.array(q)), bits


def test_gptq_integers_are_carried_into_mlx(tmp_path, tiny_llama):
    import json

    import mlx.core as mx
    from safetensors.numpy import load_file

    from edgellm.export.gguf_gptq import packed_linears
    from edgellm.gptq_checkpoint import dequantized_state

    recipe = write_tiny_recipe(tmp_path / "recipe.toml", tiny_llama, """
[[variant]]
name = "gptq-q4"
compress = [{ method = "gptq" }]
export = { format = "mlx", weights = "q4" }
""")
    out = tmp_path / "out"
    result = run_cli("run", recipe, "--out", out)
    assert result.returncode == 0, result.stderr
    (step,) = [p for p in (out / "_work" / "steps").glob("gptq-*") if p.suffix != ".resume"]
    config = json.loads((step / "config.json").read_text())["quantization_config"]
    assert config["edgellm_grid"] == "nbits4-g64-asym"
    linears, solved = packed_linears(step), dequantized_state(step)
    stored = {}
    for path in (out / "gptq-q4" / "mlx").glob("*.safetensors"):
        stored.update(load_file(path))
    assert linears
    for name, linear in linears.items():
        q, scales, biases = (mx.array(stored[f"{name}.{p}"]) for p in ("weight", "scales", "biases"))
        values = np.array(mx.dequantize(q, scales, biases, group_size=64, bits=4).astype(mx.float32))
        expected = solved[f"{name}.weight"].numpy()
        step_size = np.repeat(linear.scale.float().numpy(), 64, axis=1)
        # the same integers: each weight within float16's rounding of the bias, < 1% of a step
        assert np.abs(values - expected).max() <= 0.01 * step_size.max()
        assert np.array_equal(np.round((values - expected) / step_size), np.zeros_like(values))

    # MLX (float16 activations) scores like torch on the checkpoint's own weights
    assert window_nll_of("mlx", out / "gptq-q4" / "mlx") == pytest.approx(
        window_nll_of("torch", step), rel=0.005)
