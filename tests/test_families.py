"""Every supported family, on tiny random models (tests/families.py), through GGUF export,
layer-wise compression and structured pruning: llama.cpp scores the same ids as torch,
GPTQ integers reach llama.cpp, SmoothQuant is an exact rewrite, and an unknown
architecture is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import run_cli, shared_text
from families import FAMILIES, build_family

WINDOW = (np.arange(64, dtype=np.int32) * 7) % 250


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """name → HF folder, each family built once for the module."""
    root = tmp_path_factory.mktemp("families")
    return {name: build_family(name, root / name) for name in FAMILIES}


def scores(fmt: str, path):
    """(NLL of WINDOW, 8 greedy tokens after its first 16) in the format's runtime."""
    from edgellm.runtimes import open_runtime, window_nll

    runtime = open_runtime(fmt, str(path), 1, 64)
    nll, _ = window_nll(runtime, WINDOW)
    tokens = runtime.generate(WINDOW[:16], 8).tokens
    runtime.close()
    return nll, tokens


def torch_reference(folder):
    return scores("torch", folder)


def llamacpp_scores(path):
    return scores("gguf", path)


def calibration():
    from edgellm.recipe import CalibrationSpec

    return CalibrationSpec(text=str(shared_text("wikitext-2-valid.txt")), samples=4, seqlen=64)


def compressed(folder, dest, step: dict):
    from edgellm.compress import Context, apply_step

    dest.mkdir()
    apply_step(step, folder, dest, Context(calibration=calibration()))
    return dest


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_f16_and_f32_score_like_torch(family_models, family, tmp_path):
    """f16 and f32 within 0.5% of torch; f32 also gives torch's greedy tokens (f16's weight
    rounding may flip a near-tie of these random models: seen once in seven)."""
    from edgellm.export.gguf import export_gguf

    folder = family_models[family]
    torch_nll, torch_tokens = torch_reference(folder)
    # peaked random models: ppl in the hundreds, so a misplaced tensor moves it far
    assert np.exp(torch_nll / 63) > 50
    for weights in ("f16", "f32"):
        path = export_gguf(folder, tmp_path / f"{weights}.gguf", weights, tmp_path / "work")
        gguf_nll, gguf_tokens = llamacpp_scores(path)
        assert gguf_nll == pytest.approx(torch_nll, rel=0.005), weights
    assert gguf_tokens == torch_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_gptq_q4_0_blocks_score_like_torch_dequantized(family_models, family, tmp_path):
    from edgellm.export.gguf import export_gguf

    gptq = compressed(family_models[family], tmp_path / "gptq", {"method": "gptq", "grid": "q4_0"})
    path = export_gguf(gptq, tmp_path / "model.gguf", "q4_0", tmp_path / "work")
    torch_nll, _ = torch_reference(gptq)  # the same dequantized weights, in torch
    gguf_nll, _ = llamacpp_scores(path)
    assert gguf_nll == pytest.approx(torch_nll, rel=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_is_an_exact_rewrite(family_models, family, tmp_path):
    from edgellm.models import load_folder_model

    folder = family_models[family]
    smoothed = compressed(folder, tmp_path / "sq", {"method": "smoothquant", "alpha": 0.5})
    ids = torch.from_numpy(WINDOW.astype(np.int64))[None]
    with torch.no_grad():
        before = load_folder_model(folder)(ids).logits
        after = load_folder_model(smoothed)(ids).logits
    assert not torch.equal(load_tensors_of(folder), load_tensors_of(smoothed))
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())


def load_tensors_of(folder):
    from conftest import load_tensors

    tensors = load_tensors(folder)
    return torch.cat([t.flatten().float() for _, t in sorted(tensors.items()) if t.dim() == 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_and_depth_run_on_every_family(family_models, family, tmp_path):
    from conftest import load_tensors

    folder = family_models[family]
    wanda = compressed(folder, tmp_path / "wanda", {"method": "wanda", "sparsity": 0.5})
    weights = [t for n, t in load_tensors(wanda).items() if "layers" in n and t.dim() == 2]
    assert abs(sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)
               - 0.5) < 0.01
    depth = compressed(folder, tmp_path / "depth", {"method": "depth", "drop": 0.5})
    config = json.loads((depth / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
    for key in ("layer_types", "no_rope_layers"):
        assert len(config.get(key) or [0]) == 1
    torch_reference(depth)  # the pruned model loads and runs


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phi3"])
def test_width_pruning_keeps_a_loadable_model(family_models, family, tmp_path):
    width = compressed(family_models[family], tmp_path / "width",
                       {"method": "width", "ffn": 0.5, "heads": 0.5})
    config = json.loads((width / "config.json").read_text())
    assert config["intermediate_size"] == 64 and config["num_key_value_heads"] == 1
    torch_reference(width)


def test_width_on_fused_phi3_is_refused_before_work(family_models, tmp_path):
    from edgellm.errors import UserError

    with pytest.raises(UserError, match="width pruning"):
        compressed(family_models["phi3"], tmp_path / "width", {"method": "width", "ffn": 0.5})


def test_unknown_architecture_is_one_line_exit_2(family_models, tmp_path):
    import shutil

    folder = tmp_path / "odd"
    shutil.copytree(family_models["llama3"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    config["model_type"] = "gpt_neox"
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("export", folder, "--to", "gguf", "--out", tmp_path / "out")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "edgellm/archs/" in line and "Qwen3ForCausalLM" in line
    assert not (tmp_path / "out").exists()


def test_unhandled_rope_type_is_refused_before_work(family_models, tmp_path):
    import shutil

    folder = tmp_path / "rope"
    shutil.copytree(family_models["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    result = run_cli("export", folder, "--to", "gguf", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "rope type dynamic" in result.stderr and "edgellm/archs/qwen2.py" in result.stderr
    assert not (tmp_path / "out").exists()


def test_gemma3_gguf_lists_each_layers_attention_kind(family_models, tmp_path):
    import gguf

    from edgellm.export.gguf import export_gguf

    path = export_gguf(family_models["gemma3"], tmp_path / "g.gguf", "f32", tmp_path / "work")
    fields = gguf.GGUFReader(path).fields
    assert fields["gemma3.attention.sliding_window_pattern"].contents() == [True, False]
    assert fields["general.architecture"].contents() == "gemma3"


def test_a_tokenizer_that_adds_bos_starts_every_window_with_it(family_models, tmp_path):
    """Llama 3's tokenizer puts BOS first: the run says so, llama.cpp scores the same
    BOS-led windows as torch (the GGUF records add_bos_token from the tokenizer), and so
    does `edgellm eval` of that GGUF alone."""
    import shutil

    import gguf
    from conftest import write_tiny_recipe
    from tokenizers import Tokenizer, processors

    folder = tmp_path / "llama3-bos"
    shutil.copytree(family_models["llama3"], folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    tokenizer.save(str(folder / "tokenizer.json"))
    recipe = write_tiny_recipe(tmp_path / "recipe.toml", folder, """
[[variant]]
name = "gguf-f16"
export = { format = "gguf", weights = "f16" }
""")
    result = run_cli("run", recipe, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["eval"]["bos"] == {"added": True, "id": 1}
    assert report["eval"]["tokens_scored"] == 8 * 63
    rows = {v["name"]: v for v in report["variants"]}
    assert abs(rows["gguf-f16"]["ppl_delta_pct"]) < 0.5
    fields = gguf.GGUFReader(tmp_path / "out" / "gguf-f16" / "model.gguf").fields
    assert bool(fields["tokenizer.ggml.add_bos_token"].contents())
    # `edgellm eval` of the same file scores the same BOS-led windows as the run
    evaluated = run_cli("eval", tmp_path / "out" / "gguf-f16" / "model.gguf", "--ctx", 64,
                        "--max-tokens", 512, "--decode-tokens", 4, "--threads", 1, "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    alone = json.loads(evaluated.stdout)
    assert alone["bos"] == 1 and alone["tokens"] == 8 * 63
    assert alone["ppl"] == pytest.approx(rows["gguf-f16"]["ppl"], rel=1e-6)
