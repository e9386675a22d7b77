"""ggml's own header parser (export/gguf_index.py) finds every tensor where gguf-py does."""

import gguf
import numpy as np

from edgellm.export.gguf import quantize_gguf
from edgellm.export.gguf_float import f32_intermediate
from edgellm.export.gguf_index import read_rows, tensor_index


def test_the_index_agrees_with_gguf_py_on_every_tensor_of_float_and_quantized_files(
        tmp_path, tiny_llama):
    f32 = f32_intermediate(tiny_llama, tmp_path)
    mixed = tmp_path / "mixed.gguf"
    quantize_gguf(f32, mixed, "q8_0", tensor_types={"blk.0.ffn_down.weight": "Q4_0",
                                                    "blk.1.attn_q.weight": "Q5_0"})
    for path in (f32, mixed):
        spans, data = tensor_index(path), np.memmap(path, dtype=np.uint8, mode="r")
        tensors = gguf.GGUFReader(path).tensors
        assert list(spans) == [t.name for t in tensors]
        for tensor in tensors:
            span = spans[tensor.name]
            assert (span.kind, span.nbytes) == (tensor.tensor_type, int(tensor.n_bytes))
            assert span.shape == tuple(int(n) for n in reversed(tensor.shape))
            values = gguf.quants.dequantize(read_rows(data, span), span.kind)
            expected = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            assert np.array_equal(values.reshape(expected.shape), expected)
    kinds = {span.kind.name for span in tensor_index(mixed).values()}
    assert {"Q4_0", "Q5_0", "Q8_0", "F32"} <= kinds


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    import pytest

    path = tmp_path / "not.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        tensor_index(path)
