"""GGUF export on a tiny random llama: tensors survive the round trip, llama.cpp scores the
same ids as torch, and quantized types come from llama.cpp's own quantizer."""

import numpy as np
import pytest
import torch

from edgellm.export.gguf import export_gguf, write_float_gguf
from edgellm.runtimes import open_runtime, window_nll


def test_f32_gguf_round_trips_through_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    write_float_gguf(tiny_llama, tmp_path / "tiny-f32.gguf", "f32", tmp_path / "work")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny-f32.gguf")
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for name, tensor in original.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_gguf_metadata_carries_tokenizer_and_hparams(tiny_llama, tmp_path):
    import gguf

    path = tmp_path / "tiny-f16.gguf"
    write_float_gguf(tiny_llama, path, "f16", tmp_path / "work")
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 1
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.freq_base"].contents() == pytest.approx(10000.0)


@pytest.mark.parametrize("weights, rel", [("f32", 1e-4), ("f16", 2e-3), ("bf16", 2e-2)])
def test_llamacpp_scores_the_same_ids_as_torch(tiny_llama, tmp_path, weights, rel):
    path = export_gguf(tiny_llama, tmp_path / f"tiny-{weights}.gguf", weights, tmp_path)
    window = (np.arange(64, dtype=np.int32) * 7) % 250
    torch_nll, _ = window_nll(open_runtime("torch", str(tiny_llama), 1, 64), window)
    llama = open_runtime("gguf", str(path), 1, 64)
    llama_nll, count = window_nll(llama, window)
    llama.close()
    assert count == 63
    assert llama_nll == pytest.approx(torch_nll, rel=rel)


def test_quantized_type_is_smaller_and_written_atomically(tiny_llama, tmp_path):
    import gguf

    f16 = export_gguf(tiny_llama, tmp_path / "f16.gguf", "f16", tmp_path)
    q8 = export_gguf(tiny_llama, tmp_path / "q8.gguf", "q8_0", tmp_path)
    assert q8.stat().st_size < f16.stat().st_size
    types = {t.tensor_type.name for t in gguf.GGUFReader(q8).tensors}
    assert "Q8_0" in types
    assert not list(tmp_path.glob(".*.tmp-*"))
