"""An MLX folder under a size budget: bits and group size per weight matrix (MLX's affine
quantization, the embedding included), chosen to minimise the predicted KL divergence.

The damage of each matrix on each candidate is ½ Σ F ⊙ (W − Ŵ)² with F the diagonal
Fisher information per column (export/fisher.py) and Ŵ what MLX computes from the tensors
edgellm writes: the float16 weight on MLX's affine groups, each group's range narrowed as
the Fisher-weighted error prefers (mlx-lm's own rounding takes the full min/max range:
on SmolLM2 at 4.5 bpw that cost +41% against the float model; README), read back through
`mx.dequantize`. Bytes are the packed integers plus float16 scales and biases; every other
byte of the folder is measured once from mlx-lm's float16 export. The allocation is the
knapsack shared with GGUF and ONNX (export/allocation.py); mlx-lm's converter writes the
folder with its per-layer quantization predicate, so `mlx_lm.load` reads the types from
config.json, and the planned matrices' tensors are then replaced by the searched ones.
With GPTQ before it, every decoder matrix is solved onto its planned bits and groups and
its integers written instead (export/mlx_gptq.py); the embedding keeps the search.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from edgellm.export.allocation import allocate

ALLOCATION_FILE = "allocation.json"  # beside the artifact: the plan and its predicted damage
CANDIDATE = re.compile(r"q(2|3|4|5|6|8)-g(32|64|128)")
KNOWN_CANDIDATES = tuple(f"q{b}-g{g}" for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 128))
# no 3-bit by default: on SmolLM2 at 4.5 bpw a plan with q3-g64 predicted less damage and
# measured worse than q4-g64 everywhere (README, "ONNX and MLX under a size budget")
BUDGET_CANDIDATES = ("q4-g128", "q4-g64", "q4-g32", "q5-g64", "q6-g64", "q8-g64")
TENSOR_BYTES = 512  # safetensors header bytes the scales and biases of one matrix add: a bound


def candidate_bits(name: str) -> tuple[int, int]:
    """(bits, group size) a candidate names."""
    match = CANDIDATE.fullmatch(name)
    return int(match[1]), int(match[2])


def candidate_bpw(candidates) -> dict[str, float]:
    """Bits per weight of each candidate: integers plus a float16 scale and bias per group."""
    return {c: bits + 32 / group for c in candidates for bits, group in [candidate_bits(c)]}


def searched(weight: np.ndarray, bits: int, group: int, fisher: np.ndarray) -> dict[str, np.ndarray]:
    """{"weight", "scales", "biases"} of a matrix as MLX stores them, rounded onto MLX's
    affine groups with each group's range narrowed as the Fisher-weighted error prefers
    (mlx-lm rounds at the full min/max range; the search is the one ONNX budgets and
    GPTQ's static scales use): the float16 weight on the NBits grid with zero points,
    bias = −zero·scale (export/mlx_gptq.py)."""
    import torch

    from edgellm.export.mlx_gptq import affine_tensors
    from edgellm.grids import NBits, fit_matrix

    w = torch.from_numpy(weight.astype(np.float16).astype(np.float32))
    q, scale, zero = fit_matrix(NBits(bits, group, False), w,
                                torch.from_numpy(fisher.astype(np.float32)))
    return affine_tensors(q.numpy().astype(np.uint32), scale.numpy(), zero.numpy(), bits)


def computed(tensors: dict[str, np.ndarray], bits: int, group: int) -> np.ndarray:
    """The float32 matrix MLX computes from stored {"weight", "scales", "biases"}."""
    import mlx.core as mx

    values = mx.dequantize(*(mx.array(tensors[p]) for p in ("weight", "scales", "biases")),
                           group_size=group, bits=bits)
    return np.array(values.astype(mx.float32))


def damage_table(weights, fisher, candidates, attenuation=None
                 ) -> dict[str, dict[str, tuple[int, float]]]:
    """{HF parameter: {candidate: (bytes, predicted KL)}} of every matrix; with
    `attenuation` (export/gptq_pricing.py), the damage GPTQ would leave of the rounding's."""
    attenuation = attenuation or {}
    table = {}
    for name, weight in weights.items():
        table[name] = {}
        for candidate in candidates:
            bits, group = candidate_bits(candidate)
            if weight.shape[1] % group:
                continue
            tensors = searched(weight, bits, group, fisher[name])
            error = ((computed(tensors, bits, group) - weight) ** 2).sum(axis=0)
            nbytes = sum(t.nbytes for t in tensors.values())
            priced = fisher[name] * attenuation.get(name, 1.0)
            table[name][candidate] = (nbytes, 0.5 * float((priced * error).sum()))
    return table


def fixed_bytes(model_dir: Path, weights: dict[str, np.ndarray], work: Path) -> int:
    """Bytes of the folder that are not priced matrices: mlx-lm's float16 export measured
    once (then removed), less the matrices' float16 bytes, plus header room for scales."""
    from edgellm.artifacts import sha256_files
    from edgellm.export.mlx import export_mlx

    key = sha256_files(sorted(Path(model_dir).glob("*.safetensors")))[:12]
    cache = work / f"mlx-fixed-bytes-{key}.json"
    if not cache.is_file():
        folder = work / f"mlx-f16-{key}"
        shutil.rmtree(folder, ignore_errors=True)
        export_mlx(model_dir, folder, "f16", work)
        total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        shutil.rmtree(folder)
        cache.write_text(json.dumps({"f16_bytes": total}))
    total = json.loads(cache.read_text())["f16_bytes"]
    return total - sum(2 * w.size for w in weights.values()) + TENSOR_BYTES * len(weights)


def budget_plan(model_dir: Path, spec, work: Path, calibration, gptq: bool = False) -> dict:
    """The plan for spec.max_size_mb: Fisher pass, damage of every candidate per matrix,
    the allocation (a candidate per HF parameter, predicted bytes and KL). `gptq`: GPTQ
    solves the matrices after the plan, which prices what it would leave (gptq_pricing)."""
    from edgellm.artifacts import sha256_files, sha256_json
    from edgellm.export.allocation import cached_table
    from edgellm.export.fisher import fisher_by_parameter, float_matrices
    from edgellm.export.gptq_pricing import gptq_attenuation

    attenuation = gptq_attenuation(model_dir, calibration, work) if gptq else {}  # first:
    fisher = fisher_by_parameter(model_dir, calibration, work)  # computed in its pass
    key = sha256_json([sha256_files(sorted(Path(model_dir).glob("*.safetensors"))),
                       {k: float(v.sum()) for k, v in fisher.items()}, list(spec.candidates),
                       "searched", {k: float(v.sum()) for k, v in attenuation.items()}])

    def price() -> dict:
        weights = {n: w for n, w in float_matrices(model_dir).items() if n in fisher}
        table = damage_table(weights, fisher, tuple(spec.candidates), attenuation)
        priced = {n: w for n, w in weights.items() if table[n]}  # the rest stays float16
        return {"table": table, "fixed": fixed_bytes(model_dir, priced, work)}

    priced = cached_table(work / f"mlx-damage-{key[:16]}.json", price)
    types, size, damage = allocate(priced["table"], priced["fixed"],
                                   int(spec.max_size_mb * 1e6), align=1, what="MLX folder")
    return {"max_size_mb": spec.max_size_mb, "candidates": list(spec.candidates),
            "predicted_bytes": size, "predicted_kl": damage, "tensor_types": types,
            "priced_for": "gptq" if gptq else "rounding"}


def plan_modules(record: dict) -> dict[str, str]:
    """{HF module: what GPTQ solves it onto}: each candidate's groups are the NBits grid
    with zero points at its width (export/mlx_gptq.py)."""
    from edgellm.grids import NBits

    out = {}
    for name, candidate in record["tensor_types"].items():
        bits, group = candidate_bits(candidate)
        out[name.removesuffix(".weight")] = NBits(bits, group, False).label
    return out


def layer_settings(record: dict) -> dict[str, dict]:
    """{mlx-lm module path: {"bits", "group_size"}}: mlx-lm's modules carry the HF names."""
    out = {}
    for name, candidate in record["tensor_types"].items():
        bits, group = candidate_bits(candidate)
        out[name.removesuffix(".weight")] = {"bits": bits, "group_size": group}
    return out


def stored_types(folder: Path) -> dict[str, dict[str, int]]:
    """{qB-gG / f16: {"tensors", "bytes"}} of the folder's matrices, read from its files."""
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text()).get("quantization") or {}
    out: dict[str, dict[str, int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="numpy") as handle:
            for name in handle.keys():
                module, _, part = name.rpartition(".")
                info = handle.get_slice(name)
                if len(info.get_shape()) != 2:
                    continue
                setting = config.get(module)
                kind = f"q{setting['bits']}-g{setting['group_size']}" if isinstance(setting, dict) else "f16"
                entry = out.setdefault(kind, {"tensors": 0, "bytes": 0})
                entry["tensors"] += part == "weight"
                entry["bytes"] += int(np.prod(info.get_shape())) * _itemsize(info.get_dtype())
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


def _itemsize(dtype: str) -> int:
    return {"U32": 4, "F16": 2, "BF16": 2, "F32": 4, "U8": 1}.get(dtype, 4)


def searched_modules(float_dir: Path, record: dict, solved: set[str], work: Path,
                     calibration) -> dict[str, dict[str, np.ndarray]]:
    """{module: MLX tensors} of every planned matrix GPTQ did not solve, rounded as priced."""
    from edgellm.export.fisher import fisher_by_parameter, float_matrices

    planned = {n: c for n, c in record["tensor_types"].items() if n.removesuffix(".weight") not in solved}
    if not planned:
        return {}
    fisher = fisher_by_parameter(float_dir, calibration, work)
    weights = float_matrices(float_dir)
    return {name.removesuffix(".weight"): searched(weights[name], *candidate_bits(c), fisher[name])
            for name, c in planned.items()}


def export_budget_mlx(model_dir: Path, target: Path, spec, work: Path, calibration) -> Path:
    """The plan, then mlx-lm's converter with one quantization per module; refused if a
    planned module was not quantized as planned or the folder came out over the budget."""
    import contextlib
    import io

    from mlx_lm import convert

    from edgellm.errors import UserError
    from edgellm.export.allocation import carried_plan
    from edgellm.export.gguf_float import dequantized_folder
    from edgellm.export.mlx import check_mlx_support, record_export
    from edgellm.export.mlx_gptq import gptq_modules, replace_in_mlx
    from edgellm.models import is_packed_folder

    check_mlx_support(json.loads((Path(model_dir) / "config.json").read_text()), str(model_dir))
    record = carried_plan(model_dir, spec)
    float_dir = dequantized_folder(model_dir, work) if is_packed_folder(model_dir) else model_dir
    record = record or budget_plan(float_dir, spec, work, calibration)
    settings = layer_settings(record)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        convert(str(float_dir), str(target), quantize=True, q_group_size=32, q_bits=4,
                dtype="float16", quant_predicate=lambda path, module: settings.get(path, False))
    (work / "mlx-budget.log").write_text(log.getvalue())
    (target / "README.md").unlink(missing_ok=True)
    solved = gptq_modules(model_dir, target) if float_dir != model_dir else {}
    # one rewrite of the folder: GPTQ's integers where it solved, the searched groups elsewhere
    replaced = replace_in_mlx(target, {**searched_modules(float_dir, record, set(solved), work,
                                                         calibration), **solved}, "the plan wrote")
    record["gptq_tensors"] = len(replaced & set(solved))
    record_export(target, "mixed", None)
    written_config = json.loads((target / "config.json").read_text())["quantization"]
    missing = [p for p, s in settings.items() if written_config.get(p) != s]
    written = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    if missing or written > spec.max_size_mb * 1e6:
        raise UserError(f"mlx-lm wrote {written} bytes for a plan of {record['predicted_bytes']} "
                        f"({len(missing)} modules not as planned, e.g. {missing[:1]}): please "
                        "report it")
    record["written_bytes"] = written
    (target.parent / ALLOCATION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return target
