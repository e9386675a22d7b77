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


def test_one_converter_process_serves_a_run_and_a_failure_is_one_line(tiny_llama, tmp_path):
    import hashlib

    from edgellm.errors import UserError
    from edgellm.export import llama_converter

    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_float_gguf(tiny_llama, first, "f16", tmp_path / "work-a")
    pid = llama_converter._WORKER.proc.pid
    write_float_gguf(tiny_llama, second, "f16", tmp_path / "work-b")
    assert llama_converter._WORKER.proc.pid == pid  # the same process, hooks put back
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)}
    assert len(digests) == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(UserError, match="could not convert"):
        llama_converter.convert(broken, tmp_path / "c.gguf", "f16", tmp_path / "work-c")
    assert not (tmp_path / "c.gguf").exists()
    write_float_gguf(tiny_llama, tmp_path / "d.gguf", "f16", tmp_path / "work-d")
    assert hashlib.sha256((tmp_path / "d.gguf").read_bytes()).hexdigest() in digests


def test_an_interrupted_conversion_ends_its_converter_process(tiny_llama, tmp_path, monkeypatch):
    import os

    from edgellm.export import llama_converter

    write_float_gguf(tiny_llama, tmp_path / "a.gguf", "f16", tmp_path / "work")
    proc = llama_converter._WORKER.proc

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(proc.stdout, "readline", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_float_gguf(tiny_llama, tmp_path / "b.gguf", "f16", tmp_path / "work-b")
    assert proc.poll() is not None and llama_converter._WORKER.proc is None
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    assert not (tmp_path / "b.gguf").exists()


def test_a_gguf_llama_cpp_cannot_load_is_not_published(tiny_llama, tmp_path):
    """check_loads opens every GGUF edgellm writes in llama.cpp first: one missing a tensor
    the architecture needs is refused and removed."""
    import numpy as np

    from edgellm.errors import UserError
    from edgellm.export.gguf import check_loads
    from edgellm.export.gguf_gptq import write_like
    from edgellm.gguf_bounds import read_gguf_meta, tensor_array

    good = tmp_path / "good.gguf"
    write_float_gguf(tiny_llama, good, "f16", tmp_path / "work")
    check_loads(good, tmp_path / "good.log")
    meta, data = read_gguf_meta(good), np.memmap(good, dtype=np.uint8, mode="r")
    broken = tmp_path / "broken.gguf"
    write_like(meta, broken, ((name, tensor_array(data, span), span.kind)
                              for name, span in meta.spans.items()
                              if name != "blk.0.attn_q.weight"))
    with pytest.raises(UserError, match="llama.cpp cannot load"):
        check_loads(broken, tmp_path / "broken.log")
    assert not broken.exists() and (tmp_path / "broken.log").is_file()


def test_a_gguf_source_whose_tensors_run_past_its_end_is_one_line(tiny_llama, tmp_path):
    import os

    from conftest import run_cli

    path = tmp_path / "cut.gguf"
    write_float_gguf(tiny_llama, path, "f16", tmp_path / "work")
    os.truncate(path, path.stat().st_size - 100)
    result = run_cli("export", path, "--out", tmp_path / "out")
    assert result.returncode == 2 and "truncated or corrupt (tensor" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
