"""Importance-matrix quantization: statistics collected in torch reach llama.cpp's quantizer."""

import gguf
import numpy as np
import pytest

from edgellm.export.gguf import export_gguf
from edgellm.export.imatrix import compute_imatrix
from edgellm.recipe import parse_recipe


@pytest.fixture(scope="module")
def tiny_imatrix(tiny_llama, tmp_path_factory):
    cache = tmp_path_factory.mktemp("imatrix") / "imatrix.npz"
    return compute_imatrix(tiny_llama, "wikitext-2-valid", samples=4, seqlen=64, cache=cache), cache


def test_one_entry_per_linear_layer_named_as_in_gguf(tiny_imatrix):
    matrix, cache = tiny_imatrix
    # the logits' matrix is the tied embedding, named as the tensor llama.cpp multiplies
    assert set(matrix) == {f"blk.{b}.{t}.weight" for b in range(2) for t in
                           ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                            "ffn_down")} | {"token_embd.weight"}
    assert matrix["blk.0.attn_q.weight"].shape == matrix["token_embd.weight"].shape == (64,)
    assert matrix["blk.1.ffn_down.weight"].shape == (128,)
    assert all(np.all(v > 0) for v in matrix.values())
    assert cache.is_file()
    # q/k/v read one tensor (squared once), o_proj another
    assert np.array_equal(matrix["blk.0.attn_q.weight"], matrix["blk.0.attn_v.weight"])
    assert not np.allclose(matrix["blk.0.attn_q.weight"], matrix["blk.0.attn_output.weight"])


def test_quantizer_uses_it_and_the_weights_change(tiny_llama, tiny_imatrix, tmp_path):
    matrix, _ = tiny_imatrix
    plain = export_gguf(tiny_llama, tmp_path / "plain.gguf", "q4_0", tmp_path)
    guided = export_gguf(tiny_llama, tmp_path / "guided.gguf", "q4_0", tmp_path, imatrix=matrix)
    assert (tmp_path / "quantize-q4_0-imatrix.log").is_file()  # llama.cpp's log, kept aside
    tensors = {t.name: t.data for t in gguf.GGUFReader(plain).tensors}
    changed = [t.name for t in gguf.GGUFReader(guided).tensors
               if t.name.startswith("blk.") and not np.array_equal(t.data, tensors[t.name])]
    assert changed  # same file type, different rounding


def test_the_logits_entry_guides_the_tied_embedding(tiny_llama, tiny_imatrix, tmp_path):
    """Its values are the final norm's outputs squared, and llama.cpp rounds the tied
    embedding by them (every matrix q4_0: the embedding too)."""
    import torch

    from edgellm.data import calibration_windows
    from edgellm.export.gguf import quantize_gguf
    from edgellm.export.gguf_float import f32_intermediate
    from edgellm.models import load_folder_model

    matrix, _ = tiny_imatrix
    model = load_folder_model(tiny_llama)
    with torch.inference_mode():
        hidden = torch.cat([model.base_model(input_ids=torch.from_numpy(w.astype(np.int64))[None])
                            .last_hidden_state[0] for w in
                            calibration_windows(tiny_llama, "wikitext-2-valid", 4, 64)])
    assert np.allclose(matrix["token_embd.weight"], (hidden ** 2).mean(0).numpy(), rtol=1e-5)
    f32 = f32_intermediate(tiny_llama, tmp_path)
    without = {name: v for name, v in matrix.items() if name != "token_embd.weight"}
    embeddings = []
    for name, entries in (("with", matrix), ("without", without)):
        quantize_gguf(f32, tmp_path / f"{name}.gguf", "q4_0", imatrix=entries, pure=True)
        (embedding,) = [t for t in gguf.GGUFReader(tmp_path / f"{name}.gguf").tensors
                        if t.name == "token_embd.weight"]
        assert embedding.tensor_type == gguf.GGMLQuantizationType.Q4_0
        embeddings.append(np.array(embedding.data))
    assert not np.array_equal(*embeddings)


def test_imatrix_is_refused_where_it_means_nothing():
    from edgellm.errors import UserError

    for export in ({"format": "gguf", "weights": "f16", "imatrix": True},
                   {"format": "onnx", "weights": "int4", "imatrix": True}):
        with pytest.raises(UserError, match="imatrix only applies"):
            parse_recipe({"variant": [{"name": "a", "export": export}]})


@pytest.mark.parametrize("samples", [4, 20])
def test_the_fisher_pass_shares_the_matrix_pass_and_both_come_out_as_alone(
        tiny_llama, tmp_path, samples):
    """A budget computes the Fisher pass inside the importance matrix's (its windows are the
    first ones): same values as each computed alone, with fewer or more windows than it."""
    from edgellm.export.fisher import fisher_by_parameter, fisher_cache
    from edgellm.recipe import CalibrationSpec

    calibration = CalibrationSpec(text="wikitext-2-valid", samples=samples, seqlen=64)
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    alone.mkdir(), shared.mkdir()
    matrix = compute_imatrix(tiny_llama, calibration.text, samples, 64, alone / "m.npz")
    fisher = fisher_by_parameter(tiny_llama, calibration, alone)
    together = compute_imatrix(tiny_llama, calibration.text, samples, 64, shared / "m.npz",
                               fisher_cache(calibration, shared))
    assert fisher_cache(calibration, shared).is_file()
    assert matrix.keys() == together.keys()
    assert all(np.array_equal(matrix[name], together[name]) for name in matrix)
    with np.load(fisher_cache(calibration, shared)) as stored:
        assert stored.files and set(stored.files) == set(fisher)
        assert all(np.array_equal(stored[name], fisher[name]) for name in fisher)
