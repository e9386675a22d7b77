"""The phone examples (examples/android, examples/ios) as far as this machine allows: their
model files load in the same C libraries through Python (onnxruntime-genai, llama.cpp),
the call sequences they use give the runtime's greedy tokens, and every llama.cpp function
the Swift code calls exists in the C API."""

import ctypes
import json
import re

import numpy as np
import pytest
from conftest import REPO, run_cli

from edgellm.runtimes import open_runtime

PROMPT = np.array([1, 40, 41, 42, 43, 44, 45], dtype=np.int32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("mobile")
    for args in (["--weights", "q8_0"], ["--to", "ort", "--weights", "int4"]):
        result = run_cli("export", tiny_llama, *args, "--out", out)
        assert result.returncode == 0, result.stderr
    return out / "tiny-llama-q8_0.gguf", out / "tiny-llama-int4-ort"


def test_android_folder_generates_in_onnxruntime_genai_like_the_ort_runtime(exported):
    import onnxruntime_genai as og

    _, folder = exported
    assert (folder / "model.ort").is_file()
    assert json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"] \
        == "model.ort"
    model = og.Model(str(folder))  # what EdgeLlm.kt's Model(modelDir) loads
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + 8, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    runtime = open_runtime("ort", str(folder), threads=1, ctx=64)
    assert tokens == runtime.generate(PROMPT, 8).tokens
    runtime.close()


def test_ios_calls_exist_in_the_llama_cpp_c_api():
    import llama_cpp

    swift = (REPO / "examples" / "ios" / "EdgeLlm.swift").read_text()
    called = set(re.findall(r"\b(llama_\w+)\(", swift))
    assert len(called) >= 12
    assert [name for name in sorted(called) if not hasattr(llama_cpp, name)] == []


def test_ios_call_sequence_generates_like_the_llama_cpp_runtime(exported):
    """EdgeLlm.swift's calls, in its order, through llama-cpp-python's C bindings."""
    import llama_cpp as c

    path, _ = exported
    c.llama_backend_init()
    model = c.llama_model_load_from_file(str(path).encode(), c.llama_model_default_params())
    params = c.llama_context_default_params()
    params.n_ctx = 256
    context = c.llama_init_from_model(model, params)
    vocab = c.llama_model_get_vocab(model)
    sampler = c.llama_sampler_init_greedy()
    pending, tokens = (c.llama_token * len(PROMPT))(*PROMPT.tolist()), []
    for _ in range(8):
        assert c.llama_decode(context, c.llama_batch_get_one(pending, len(pending))) == 0
        token = c.llama_sampler_sample(sampler, context, -1)
        if c.llama_vocab_is_eog(vocab, token):
            break
        buffer = ctypes.create_string_buffer(64)
        assert c.llama_token_to_piece(vocab, token, buffer, 64, 0, False) >= 0
        tokens.append(token)
        pending = (c.llama_token * 1)(token)
    c.llama_sampler_free(sampler)
    c.llama_free(context)
    c.llama_model_free(model)
    runtime = open_runtime("gguf", str(path), threads=1, ctx=64)
    expected = runtime.generate(PROMPT, 8).tokens
    runtime.close()
    assert tokens and tokens == expected[:len(tokens)]
