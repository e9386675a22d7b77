"""Share a tied embedding with the 8-bit lm_head in an ONNX int8 export.

The onnxruntime-genai builder shares a tied embedding/lm_head matrix only for 4-bit
exports (its Gather path stops there), so an int8 export of a model with tied embeddings
stores the matrix twice: a float32 embedding beside the 8-bit lm_head (SmolLM2-135M:
113 MB of 271 MB). ONNX Runtime's GatherBlockQuantized reads 8-bit blocks too, which the
builder itself uses for an int8 lm_head in int4 exports: this rewires the embedding
lookup to the lm_head's 8-bit blocks and drops the float copy. Written here because no
maintained tool does this rewrite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

EMBED_GATHER = "/model/embed_tokens/Gather"


def share_tied_int8_embedding(model_path: Path) -> bool:
    """Rewrite `model_path` (model.onnx with its external data) in place; True when done,
    False when the graph has no float embedding Gather and 8-bit lm_head to share."""
    model = onnx.load(model_path)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    gather = next((n for n in graph.node if n.name == EMBED_GATHER and n.op_type == "Gather"), None)
    if gather is None or gather.input[0] not in inits:
        return False
    vocab, width = inits[gather.input[0]].dims
    head = _lm_head(graph, vocab, width)
    if head is None:
        return False
    weight, scales = head.input[1], head.input[2]
    zero_points = head.input[3] if len(head.input) > 3 and head.input[3] else None
    block = _attribute(head, "block_size")
    shape = numpy_helper.from_array(np.array([vocab, width], dtype=np.int64),
                                    "/model/embed_tokens/shared_shape")
    blocks = numpy_helper.from_array(np.array([vocab, width // block], dtype=np.int64),
                                     "/model/embed_tokens/shared_block_shape")
    nodes = [helper.make_node("Reshape", [weight, shape.name], ["/model/embed_tokens/weight_q8"],
                              name="/model/embed_tokens/Reshape")]
    quant_inputs = [_reshaped(nodes, scales, blocks.name, "scales")]
    if zero_points:
        quant_inputs.append(_reshaped(nodes, zero_points, blocks.name, "zero_points"))
    nodes.append(helper.make_node(
        "GatherBlockQuantized", ["/model/embed_tokens/weight_q8", gather.input[1], *quant_inputs],
        list(gather.output), name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft",
        bits=8, block_size=block, gather_axis=0, quantize_axis=1))
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    graph.initializer.remove(inits[gather.input[0]])
    graph.initializer.extend([shape, blocks])
    save_model(model, model_path)
    return True


def _lm_head(graph, vocab: int, width: int):
    for node in graph.node:
        if (node.op_type == "MatMulNBits" and _attribute(node, "bits") == 8
                and _attribute(node, "N") == vocab and _attribute(node, "K") == width):
            return node
    return None


def _attribute(node, name: str):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


def _reshaped(nodes: list, name: str, shape: str, what: str) -> str:
    """MatMulNBits may keep scales/zero points flat; GatherBlockQuantized wants [V, blocks]."""
    output = f"/model/embed_tokens/{what}"
    nodes.append(helper.make_node("Reshape", [name, shape], [output], name=f"{output}/Reshape"))
    return output


def save_model(model, model_path: Path) -> None:
    """Write the graph and one fresh external-data file (onnx appends to an existing one)."""
    data = model_path.with_name(model_path.name + ".data")
    tmp_model = model_path.with_name(model_path.name + ".tmp")
    tmp_data = model_path.with_name(data.name + ".tmp")
    tmp_data.unlink(missing_ok=True)
    onnx.save_model(model, tmp_model, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=tmp_data.name, size_threshold=1024)
    # the graph names its data file: point it at the final name before renaming
    final = onnx.load(tmp_model, load_external_data=False)
    for tensor in final.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = data.name
    onnx.save_model(final, tmp_model)
    # onnx creates it private; keep the builder's mode (or the model file's, for a new one)
    tmp_data.chmod((data if data.exists() else tmp_model).stat().st_mode & 0o777)
    tmp_data.replace(data)
    tmp_model.replace(model_path)
