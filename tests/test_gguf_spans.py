"""The GGUF walk (edgellm/gguf_bounds.py) finds every tensor where gguf-py's reader does and
reads the same metadata: the sensitivity table reads each candidate file's matrices through
it, and GPTQ's GGUF writer (export/gguf_gptq.py) copies files through it."""

import gguf
import numpy as np

from edgellm.export.gguf import quantize_gguf
from edgellm.export.gguf_float import f32_intermediate
from edgellm.gguf_bounds import read_gguf_meta, tensor_array


def test_the_walk_places_every_tensor_of_float_and_quantized_files_as_gguf_py_does(
        tmp_path, tiny_llama):
    f32 = f32_intermediate(tiny_llama, tmp_path)
    mixed = tmp_path / "mixed.gguf"
    quantize_gguf(f32, mixed, "q8_0", tensor_types={"blk.0.ffn_down.weight": "Q4_0",
                                                    "blk.1.attn_q.weight": "Q5_0"})
    for path in (f32, mixed):
        spans, data = read_gguf_meta(path).spans, np.memmap(path, dtype=np.uint8, mode="r")
        tensors = gguf.GGUFReader(path).tensors
        assert list(spans) == [t.name for t in tensors]
        for tensor in tensors:
            span = spans[tensor.name]
            assert (span.kind, span.nbytes) == (tensor.tensor_type, int(tensor.n_bytes))
            assert span.shape == tuple(int(n) for n in reversed(tensor.shape))
            assert span.offset == tensor.data_offset
            stored = data[span.offset:span.offset + span.nbytes]
            assert np.array_equal(stored, np.asarray(tensor.data).reshape(-1).view(np.uint8))
            array = tensor_array(data, span)  # as gguf-py's writer takes it
            assert (array.dtype, array.shape) == (tensor.data.dtype, tensor.data.shape)
            assert np.array_equal(array, tensor.data)
    kinds = {span.kind.name for span in read_gguf_meta(mixed).spans.values()}
    assert {"Q4_0", "Q5_0", "Q8_0", "F32"} <= kinds


def test_the_walk_reads_every_metadata_value_as_gguf_py_does(tmp_path, tiny_llama):
    f32 = f32_intermediate(tiny_llama, tmp_path)
    fields = read_gguf_meta(f32).fields
    reader = {k: f for k, f in gguf.GGUFReader(f32).fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == list(reader)
    assert any(kind == gguf.GGUFValueType.ARRAY for kind, _, _ in fields.values())
    for key, field in reader.items():
        kind, item, value = fields[key]
        assert kind == field.types[0] and value == field.contents(), key
        assert item == (field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None), key
