"""ONNX and ORT-format export on a tiny random llama: the graph has a KV cache, scores the
same ids as torch, generates with the cache like torch, and ORT format scores like ONNX."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import run_cli

from edgellm.export.onnx import builder_options, convert_to_ort, export_onnx
from edgellm.recipe import ExportSpec
from edgellm.runtimes import open_runtime, window_nll

WINDOW = (np.arange(64, dtype=np.int32) * 7) % 250


@pytest.fixture(scope="module")
def onnx_models(tiny_llama, tmp_path_factory):
    work = tmp_path_factory.mktemp("onnx")
    f32 = export_onnx(tiny_llama, work / "f32", ExportSpec(format="onnx", weights="f32"), work)
    int4 = export_onnx(tiny_llama, work / "int4", ExportSpec(format="onnx", weights="int4"), work)
    ort_dir = convert_to_ort(int4, work / "int4-ort", work)
    return SimpleNamespace(f32=f32, int4=int4, ort=ort_dir)


def score(fmt, path, window=WINDOW):
    runtime = open_runtime(fmt, str(path), threads=1, ctx=64)
    try:
        return window_nll(runtime, window)[0]
    finally:
        runtime.close()


def test_graph_has_kv_cache_inputs_and_outputs(onnx_models):
    import onnx

    graph = onnx.load(onnx_models.f32 / "model.onnx", load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    assert {"input_ids", "attention_mask", "past_key_values.0.key"} <= inputs
    assert {"logits", "present.0.key", "present.1.value"} <= outputs
    config = json.loads((onnx_models.f32 / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2


def test_f32_onnx_scores_like_torch(tiny_llama, onnx_models):
    assert score("onnx", onnx_models.f32) == pytest.approx(score("torch", tiny_llama), rel=1e-4)


def test_cached_generation_matches_torch(tiny_llama, onnx_models):
    prompt = WINDOW[:16]
    torch_tokens = open_runtime("torch", str(tiny_llama), 1, 64).generate(prompt, 12).tokens
    onnx_tokens = open_runtime("onnx", str(onnx_models.f32), 1, 64).generate(prompt, 12).tokens
    assert onnx_tokens == torch_tokens


def test_f16_onnx_scores_and_generates_with_the_cache_like_f32(tiny_llama, onnx_models, tmp_path):
    """The builder's fp16 CPU graph carried shape hints that broke the first cached decode
    step ("Shape mismatch attempting to re-use buffer"); the export drops them."""
    f16 = export_onnx(tiny_llama, tmp_path / "f16", ExportSpec(format="onnx", weights="f16"), tmp_path)
    f32_bytes = (onnx_models.f32 / "model.onnx.data").stat().st_size
    assert (f16 / "model.onnx.data").stat().st_size < 0.6 * f32_bytes
    assert score("onnx", f16) == pytest.approx(score("onnx", onnx_models.f32), rel=0.01)
    prompt = WINDOW[:16]
    f32_tokens = open_runtime("onnx", str(onnx_models.f32), 1, 64).generate(prompt, 12).tokens
    assert open_runtime("onnx", str(f16), 1, 64).generate(prompt, 12).tokens == f32_tokens


def test_dynamic_int8_uses_matmulinteger_and_keeps_the_lm_head_float(tiny_llama, onnx_models, tmp_path):
    import onnx

    def op_types(folder):
        nodes = onnx.load(folder / "model.onnx", load_external_data=False).graph.node
        return {node.name: node.op_type for node in nodes}

    spec = ExportSpec(format="onnx", weights="int8-dynamic")
    dynamic = export_onnx(tiny_llama, tmp_path / "dyn", spec, tmp_path)
    ops = op_types(dynamic)
    assert list(ops.values()).count("MatMulInteger") == 2 * 5  # 2 layers: qkv, o, gate, up, down
    assert ops["/lm_head/MatMul"] == "MatMul"
    assert (dynamic / "genai_config.json").is_file()
    assert not (tmp_path / "onnx-f32-for-int8-dynamic").exists()
    assert score("onnx", dynamic) == pytest.approx(score("onnx", onnx_models.f32), rel=0.05)
    assert len(open_runtime("onnx", str(dynamic), 1, 64).generate(WINDOW[:16], 4).tokens) == 4
    spec = ExportSpec(format="onnx", weights="int8-dynamic", lm_head_bits=8)
    ops = op_types(export_onnx(tiny_llama, tmp_path / "dyn-head", spec, tmp_path))
    assert list(ops.values()).count("MatMulInteger") == 2 * 5 + 1


def test_int4_is_smaller_and_ort_format_scores_like_its_onnx(onnx_models):
    def weights_size(folder):
        return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data"))

    assert weights_size(onnx_models.int4) < weights_size(onnx_models.f32)
    assert (onnx_models.ort / "model.ort").is_file()
    assert score("ort", onnx_models.ort) == pytest.approx(score("onnx", onnx_models.int4), rel=1e-6)


def test_int4_options_reach_the_builder():
    spec = ExportSpec(format="onnx", weights="int4", block_size=64, symmetric=True)
    options = builder_options(spec)
    assert "block_size=64" in options and "is_symmetric=true" in options
    assert "is_symmetric=false" in builder_options(ExportSpec(format="onnx", weights="int4"))
    assert "matmul_mixed_precision=last_matmul:int8" in options  # tied lm_head at 8 bits
    assert builder_options(ExportSpec(format="onnx", weights="f32")) == []


def test_onnx_options_are_refused_for_gguf(tmp_path):
    from edgellm.errors import UserError
    from edgellm.recipe import parse_recipe

    with pytest.raises(UserError, match="block_size only applies to onnx/ort exports"):
        parse_recipe({"variant": [{"name": "a", "export": {"format": "gguf", "weights": "q4_0",
                                                           "block_size": 64}}]})


def test_corrupted_onnx_is_one_line_exit_2(tmp_path, onnx_models):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a protobuf")
    (tmp_path / "tokenizer.json").write_text((onnx_models.f32 / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(
        (onnx_models.f32 / "tokenizer_config.json").read_text())
    result = run_cli("eval", bad, "--ctx", 64, "--max-tokens", 128)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_unsupported_architecture_is_named(tmp_path, tiny_llama):
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    config["architectures"] = ["GPTBigCodeForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_llama / name).read_bytes())
    result = run_cli("export", folder, "--to", "onnx", "--weights", "f32", "--out", tmp_path / "o")
    assert result.returncode == 2
    assert "GPTBigCodeForCausalLM" in result.stderr and "LlamaForCausalLM" in result.stderr


def test_missing_execution_provider_is_named(onnx_models):
    import onnxruntime

    available = onnxruntime.get_available_providers()
    missing = next(p for p in ("CoreMLExecutionProvider", "CUDAExecutionProvider")
                   if p not in available)
    with pytest.raises(RuntimeError, match=f"{missing} is not in this onnxruntime"):
        open_runtime("onnx", str(onnx_models.f32), 1, 64, provider=missing)


def test_int8_export_shares_the_tied_embedding_with_the_8bit_lm_head(tiny_llama, onnx_models, tmp_path):
    import onnx

    int8 = export_onnx(tiny_llama, tmp_path / "int8", ExportSpec(format="onnx", weights="int8"), tmp_path)
    graph = onnx.load(int8 / "model.onnx", load_external_data=False).graph
    ops = {node.name: node.op_type for node in graph.node}
    assert ops["/model/embed_tokens/GatherBlockQuantized"] == "GatherBlockQuantized"
    assert "model.embed_tokens.weight" not in {init.name for init in graph.initializer}
    # the embedding rows are now 8-bit: close to fp32, not equal
    assert score("onnx", int8) == pytest.approx(score("onnx", onnx_models.f32), rel=0.02)
