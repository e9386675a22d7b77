"""An ONNX model under a size budget: bits and block size per weight matrix (MatMulNBits
4 or 8 bits, the embedding included), chosen to minimise the predicted KL divergence.

The damage of each matrix on each candidate grid is ½ Σ F ⊙ (W − Ŵ)² with F the diagonal
Fisher information per column (export/fisher.py) and Ŵ the integers written here: each
block's scale (and zero point) chosen among narrowings of its range by the Fisher-weighted
rounding error (grids.NBits.fit), round-to-nearest inside. The allocation is the same
knapsack as GGUF's (export/allocation.py), over exact bytes: every byte of the float graph
that is not a priced matrix counts as fixed. The file is the builder's fp32 graph
(export/onnx.py, q/k/v unfused so each MatMul is one HF linear) with each priced MatMul
and the embedding Gather rewritten (export/onnx_nbits.py); matrices are found by content,
so no family's node names are assumed. With GPTQ before the export, GPTQ solves each
linear onto its planned grid and its integers are written as they are.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from edgellm.errors import UserError
from edgellm.export.allocation import allocate, carried_plan
from edgellm.export.onnx_nbits import Blocks, gather_block_quantized, matmul_nbits
from edgellm.grids import NBits, fit_matrix

ALLOCATION_FILE = "allocation.json"  # beside the artifact: the plan and its predicted damage
CANDIDATE = re.compile(r"int(4|8)(?:-b(16|32|64|128|256))?")
# per-matrix candidates: 4 and 8 bits in blocks of 32 and 64, 4 bits also in blocks of 128
# (a candidate whose block does not divide a matrix's width is left out for it)
BUDGET_CANDIDATES = ("int4-b128", "int4-b64", "int4", "int8-b64", "int8")
KNOWN_CANDIDATES = tuple(f"int{b}{s}" for b in (4, 8)
                         for s in ("", *(f"-b{g}" for g in (16, 32, 64, 128, 256))))
NODE_BYTES = 1024  # graph bytes a rewritten node adds (names, attributes): an upper bound
GRAPH_OPTIONS = ("disable_qkv_fusion=true",)  # one MatMul per HF linear


def candidate_grid(name: str, spec) -> NBits:
    """The MatMulNBits grid a candidate names: int4/int8, blocks of the export's
    block_size unless `-bN` says, zero points unless the export is symmetric."""
    match = CANDIDATE.fullmatch(name)
    return NBits(int(match[1]), int(match[2] or spec.block_size), spec.symmetric)


def candidate_bpw(candidates, spec) -> dict[str, float]:
    """Bits per weight of each candidate: integers, float32 scales, zero points."""
    out = {}
    for name in candidates:
        grid = candidate_grid(name, spec)
        out[name] = grid.bits + (32 + (0 if grid.symmetric else grid.bits)) / grid.group
    return out


def float_graph(model_dir: Path, work: Path, spec) -> Path:
    """work/onnx-f32-graph-KEY: the builder's fp32 ONNX folder of `model_dir`, built once
    (`spec`: the budget's ExportSpec, exported as f32)."""
    from edgellm.artifacts import sha256_files
    from edgellm.export.onnx import export_onnx

    key = sha256_files(sorted(Path(model_dir).glob("*.safetensors")))[:12]
    folder = work / f"onnx-f32-graph-{key}"
    if (folder / "model.onnx").is_file():
        return folder
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    export_onnx(model_dir, staging, spec.model_copy(update={"weights": "f32"}), work, GRAPH_OPTIONS)
    staging.replace(folder)
    return folder


def matrix_nodes(graph, weights: dict[str, np.ndarray]) -> dict[str, list[tuple[object, str]]]:
    """{HF parameter: [(node, initializer)]}: the MatMuls whose initializer is the parameter
    transposed and the Gathers that look up its rows (from the initializer itself or from a
    Transpose of it: the builder's tied embedding), matched by content."""
    from onnx import numpy_helper

    by_content = {}
    for name, value in weights.items():
        by_content[("Gather", value.shape, value.tobytes())] = name
        by_content[("MatMul", value.T.shape, np.ascontiguousarray(value.T).tobytes())] = name
    inits = {init.name: init for init in graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits}
    found: dict[str, list] = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gather"):
            continue
        source = node.input[1 if node.op_type == "MatMul" else 0]
        flip = node.op_type == "Gather" and source in transposed
        source = transposed[source] if flip else source
        if source not in inits or len(inits[source].dims) != 2:
            continue
        value = numpy_helper.to_array(inits[source])
        value = np.ascontiguousarray(value.T) if flip else value
        name = by_content.get((node.op_type, value.shape, value.tobytes()))
        if value.dtype == np.float32 and name is not None:
            found.setdefault(name, []).append((node, source))
    return found


def fit_blocks(weight: np.ndarray, grid: NBits, fisher: np.ndarray) -> Blocks:
    """Round-to-nearest onto `grid`, each block's range narrowed as the Fisher-weighted
    rounding error prefers (grids.fit_matrix)."""
    import torch

    q, scale, zero = fit_matrix(grid, torch.from_numpy(weight),
                                torch.from_numpy(fisher.astype(np.float32)))
    return Blocks(q.numpy().astype(np.uint8), scale.numpy(), zero.numpy().astype(np.uint8),
                  grid.bits, grid.group)


def damage_table(weights, fisher, nodes, candidates, spec, attenuation=None
                 ) -> dict[str, dict[str, tuple[int, float]]]:
    """{HF parameter: {candidate: (bytes, predicted KL)}} for every matrix the graph holds;
    with `attenuation` (export/gptq_pricing.py), the damage GPTQ would leave of the rounding's."""
    attenuation = attenuation or {}
    table = {}
    for name in nodes:
        table[name] = {}
        for candidate in candidates:
            grid = candidate_grid(candidate, spec)
            if weights[name].shape[1] % grid.group:
                continue
            blocks = fit_blocks(weights[name], grid, fisher[name])
            error = ((blocks.dequantize() - weights[name]) ** 2).sum(axis=0)
            priced = fisher[name] * attenuation.get(name, 1.0)
            table[name][candidate] = (blocks.nbytes(), 0.5 * float((priced * error).sum()))
    return table


def fixed_bytes(graph_dir: Path, graph, nodes) -> int:
    """Bytes of the float graph that stay: the files less every priced float matrix (a
    matrix no candidate fits stays float and counts here), plus room for the nodes the
    rewrite adds."""
    from onnx import numpy_helper

    inits = {init.name: init for init in graph.initializer}
    sources = {source for found in nodes.values() for _, source in found}
    total = sum(f.stat().st_size for f in graph_dir.iterdir() if f.suffix in (".onnx", ".data"))
    matrices = sum(numpy_helper.to_array(inits[s]).nbytes for s in sources)
    return total - matrices + NODE_BYTES * sum(len(found) for found in nodes.values())


def price_graph(model_dir: Path, graph_dir: Path, fisher, spec, attenuation=None) -> dict:
    """{"table": damage of every candidate per matrix, "fixed": the other bytes}."""
    import onnx

    from edgellm.export.fisher import float_matrices

    graph = onnx.load(graph_dir / "model.onnx").graph
    weights = float_matrices(model_dir)
    nodes = matrix_nodes(graph, weights)
    table = damage_table(weights, fisher, nodes, tuple(spec.candidates), spec, attenuation)
    priced = {name: found for name, found in nodes.items() if table[name]}
    return {"table": table, "fixed": fixed_bytes(graph_dir, graph, priced)}


def budget_plan(model_dir: Path, spec, work: Path, calibration, gptq: bool = False) -> dict:
    """The plan for spec.max_size_mb: Fisher pass, damage of every candidate per matrix,
    the allocation (a candidate per HF parameter, predicted bytes and KL). `gptq`: GPTQ
    solves the matrices after the plan, which prices what it would leave (gptq_pricing)."""
    from edgellm.artifacts import sha256_json
    from edgellm.export.allocation import cached_table
    from edgellm.export.fisher import fisher_by_parameter
    from edgellm.export.gptq_pricing import gptq_attenuation

    attenuation = gptq_attenuation(model_dir, calibration, work) if gptq else {}  # first:
    fisher = fisher_by_parameter(model_dir, calibration, work)  # computed in its pass
    graph_dir = float_graph(model_dir, work, spec)
    key = sha256_json([graph_dir.name, {k: float(v.sum()) for k, v in fisher.items()},
                       list(spec.candidates), spec.block_size, spec.symmetric, "priced-only",
                       {k: float(v.sum()) for k, v in attenuation.items()}])[:16]
    priced = cached_table(work / f"onnx-damage-{key}.json",
                          lambda: price_graph(model_dir, graph_dir, fisher, spec, attenuation))
    types, size, damage = allocate(priced["table"], priced["fixed"],
                                   int(spec.max_size_mb * 1e6), align=1, what="ONNX file")
    return {"max_size_mb": spec.max_size_mb, "candidates": list(spec.candidates),
            "predicted_bytes": size, "predicted_kl": damage, "tensor_types": types,
            "grids": {n: candidate_grid(c, spec).label for n, c in types.items()},
            "priced_for": "gptq" if gptq else "rounding"}


def plan_modules(record: dict) -> dict[str, str]:
    """{HF module: grid label} of the plan's matrices, what GPTQ solves onto."""
    return {name.removesuffix(".weight"): label for name, label in record["grids"].items()}


def gptq_blocks(linear, grid: NBits) -> Blocks:
    """A GPTQ linear's integers as MatMulNBits blocks; refused when not on the plan's grid."""
    if (linear.bits, linear.group) != (grid.bits, grid.group):
        raise UserError(f"a GPTQ linear holds {linear.bits}-bit blocks of {linear.group} where "
                        f"the plan says {grid.label}: run GPTQ again for this budget")
    return Blocks(linear.q.numpy().astype(np.uint8), linear.scale.float().numpy(),
                  linear.zero.numpy().astype(np.uint8), grid.bits, grid.group)


def rewrite_graph(graph, nodes, blocks: dict[str, Blocks], accuracy_level: int) -> None:
    """Each planned matrix's MatMuls → MatMulNBits and Gathers → GatherBlockQuantized
    (sharing a MatMulNBits' blocks when the embedding is tied); float copies dropped."""
    dropped = set()
    for index, (name, chosen) in enumerate(sorted(blocks.items())):
        prefix = f"edgellm_nbits.{index}"
        matmuls = [(n, s) for n, s in nodes[name] if n.op_type == "MatMul"]
        shared = None
        for node, source in matmuls:
            new, new_inits = matmul_nbits(node, chosen, prefix, accuracy_level)
            _replace(graph, node, [new])
            graph.initializer.extend(new_inits)
            dropped.add(source)
            shared = (*new.input[1:3], new.input[3] if len(new.input) > 3 else None)
        for node, source in nodes[name]:
            if node.op_type != "Gather":
                continue
            new, extra, new_inits = gather_block_quantized(node, chosen, f"{prefix}.gather", shared)
            _replace(graph, node, [*extra, new])
            graph.initializer.extend(new_inits)
            dropped.add(source)
    _drop_unread(graph, dropped)


def _drop_unread(graph, sources: set[str]) -> None:
    """Remove the float matrices nothing reads any more, and Transposes of them nobody
    reads (the tied embedding's)."""
    read = {name for node in graph.node for name in node.input}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in sources
                 and n.output[0] not in read]:
        graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name in sources and i.name not in read]:
        graph.initializer.remove(init)


def _replace(graph, old, new: list) -> None:
    position = list(graph.node).index(old)
    graph.node.remove(old)
    for offset, node in enumerate(new):
        graph.node.insert(position + offset, node)


def stored_types(model_path: Path) -> dict[str, dict[str, int]]:
    """{int4-bN / int8-bN / f32: {"tensors", "bytes"}} of a model's weight matrices, read
    from the graph (MatMulNBits and GatherBlockQuantized blocks, float MatMul/Gather)."""
    import onnx
    from onnx import helper

    graph = onnx.load(model_path, load_external_data=False).graph
    sizes = {i.name: int(np.prod(i.dims)) * helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
             for i in graph.initializer}
    dims = {i.name: len(i.dims) for i in graph.initializer}
    out: dict[str, dict[str, int]] = {}
    counted = set()
    for node in graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            kind = f"int{attrs.get('bits', 4)}-b{attrs['block_size']}"
            activation = 1 if node.op_type == "GatherBlockQuantized" else 0  # the ids, or A
            weights = [n for i, n in enumerate(node.input) if i != activation and n in sizes]
        elif node.op_type in ("MatMul", "Gather") and any(dims.get(n) == 2 for n in node.input):
            kind, weights = "f32", [n for n in node.input if dims.get(n) == 2]
        else:
            continue
        new = [n for n in weights if n not in counted]
        if not new:
            continue
        counted.update(new)
        entry = out.setdefault(kind, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += sum(sizes[n] for n in new)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


def export_budget_onnx(model_dir: Path, target: Path, spec, work: Path, calibration) -> Path:
    """The whole budget export: the plan (carried by a GPTQ checkpoint solved for it, or
    worked out here), the float graph with every planned matrix rewritten, the plan
    beside the folder; refused if the file came out over the budget."""
    from edgellm.export.gguf_float import dequantized_folder
    from edgellm.export.gguf_gptq import packed_linears
    from edgellm.models import is_packed_folder

    record = carried_plan(model_dir, spec)
    packed = packed_linears(model_dir) if record is not None else {}
    float_dir = dequantized_folder(model_dir, work) if is_packed_folder(model_dir) else model_dir
    record = record or budget_plan(float_dir, spec, work, calibration)
    graph_dir = float_graph(float_dir, work, spec)
    model, solved = _planned_graph(float_dir, graph_dir, record, packed, spec, work, calibration)
    written = _write_folder(model, graph_dir, target)
    if written > spec.max_size_mb * 1e6:
        raise UserError(f"the ONNX model came to {written} bytes for a plan of "
                        f"{record['predicted_bytes']} within {spec.max_size_mb:g} MB: please report it")
    record = {**record, "gptq_tensors": solved, "written_bytes": written}
    (target.parent / ALLOCATION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return target


def _planned_graph(float_dir: Path, graph_dir: Path, record: dict, packed: dict, spec,
                   work: Path, calibration):
    """(the float graph with each planned matrix as MatMulNBits/GatherBlockQuantized blocks,
    how many of them hold GPTQ's integers): a GPTQ linear's own blocks where there is one,
    the Fisher-weighted fit elsewhere."""
    import onnx

    from edgellm.export.fisher import fisher_by_parameter, float_matrices

    model = onnx.load(graph_dir / "model.onnx")
    weights = float_matrices(float_dir)
    nodes = matrix_nodes(model.graph, weights)
    fisher = None
    blocks, solved = {}, 0
    for name, candidate in record["tensor_types"].items():
        if name not in nodes:
            continue
        grid = candidate_grid(candidate, spec)
        linear = packed.get(name.removesuffix(".weight"))
        if linear is not None:
            blocks[name], solved = gptq_blocks(linear, grid), solved + 1
            continue
        fisher = fisher or fisher_by_parameter(float_dir, calibration, work)
        blocks[name] = fit_blocks(weights[name], grid, fisher[name])
    rewrite_graph(model.graph, nodes, blocks, spec.accuracy_level)
    return model, solved


def _write_folder(model, graph_dir: Path, target: Path) -> int:
    """The rewritten graph and the float graph's side files into `target`; its bytes."""
    from edgellm.export.onnx import copy_side_files
    from edgellm.export.onnx_tied import save_model

    target.mkdir(parents=True, exist_ok=True)
    save_model(model, target / "model.onnx")
    copy_side_files(graph_dir, target)
    return sum(f.stat().st_size for f in target.iterdir() if f.suffix in (".onnx", ".data"))
