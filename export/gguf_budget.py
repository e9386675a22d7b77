"""A GGUF under a size budget: one llama.cpp type per tensor, chosen to minimise the
predicted KL divergence (export/gguf_sensitivity.py) with the whole file within the budget.

The choice is a multiple-choice knapsack over the matrices (vectors stay f32, as llama.cpp
keeps them): each tensor takes one of its candidate types, whose exact bytes are known
from the sensitivity pass, and every byte of the file that is not a matrix (metadata,
vocabulary, norms, alignment) is counted as measured from a file llama.cpp wrote. Dynamic
programming over the budget in small units finds the least total predicted damage, so a
larger budget never predicts more damage. llama.cpp's quantizer then writes the file with
one --tensor-type override per tensor, with the same importance matrix.

With GPTQ before the export (`compress = [{ method = "gptq" }]`), the plan is made on the
float model first (the format's `tensor_plan`), GPTQ solves each linear onto its tensor's
type (q4_0, q5_0, q8_0; k-quant tensors stay float for llama.cpp), the checkpoint carries
the plan, and the solved integers replace llama.cpp's rounding of those tensors block for
block (export/gguf_gptq.py): same types, same bytes, same file size.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from edgellm.errors import UserError

BUDGET_UNITS = 50_000  # the room above the smallest file, in units (see allocate)
ALLOCATION_FILE = "allocation.json"  # beside the artifact: the plan and its predicted damage


def allocate(table: dict[str, dict[str, tuple[int, float]]], fixed_bytes: int,
             budget_bytes: int, align: int = 32) -> tuple[dict[str, str], int, float]:
    """({tensor: type}, predicted file bytes, predicted damage) of the least-damage choice
    whose file fits `budget_bytes` (each tensor's data padded to `align`, as GGUF stores
    it); UserError naming the smallest possible file otherwise."""
    names = sorted(n for n in table if table[n])  # a tensor no candidate fits keeps llama.cpp's
    table = {n: {k: (-(-b // align) * align, d) for k, (b, d) in table[n].items()} for n in names}
    smallest = fixed_bytes + sum(min(b for b, _ in table[n].values()) for n in names)
    if smallest > budget_bytes:
        raise UserError(f"max_size_mb {budget_bytes / 1e6:g} is below the smallest GGUF this "
                        f"model can be with these candidate types ({smallest / 1e6:.1f} MB): "
                        "raise the budget or add smaller candidates")
    # DP over the room above the smallest file in units, each upgrade's extra bytes rounded
    # down (optimistic); then the fullest capacity whose plan, counted exactly, fits. A larger
    # budget keeps every plan that fitted a smaller one, so it never predicts more damage.
    base = {n: min(b for b, _ in table[n].values()) for n in names}
    unit = max(budget_bytes - smallest, 1) / BUDGET_UNITS
    best = np.zeros(BUDGET_UNITS + 1)  # least damage of the tensors so far within u units
    picks = []
    for name in names:
        options = sorted(table[name].items())
        damage = np.full(BUDGET_UNITS + 1, np.inf)
        pick = np.zeros(BUDGET_UNITS + 1, dtype=np.int16)
        for index, (_, (nbytes, cost)) in enumerate(options):
            width = int((nbytes - base[name]) // unit)
            if width > BUDGET_UNITS:
                continue
            shifted = np.full(BUDGET_UNITS + 1, np.inf)
            shifted[width:] = best[:BUDGET_UNITS + 1 - width] + cost
            better = shifted < damage
            damage[better], pick[better] = shifted[better], index
        best = damage
        picks.append((name, options, pick, unit, base[name]))
    for units in range(BUDGET_UNITS, -1, -1):
        types, size, damage = _backtrack(picks, units, fixed_bytes)
        if size <= budget_bytes:
            return types, size, damage
    raise AssertionError("the smallest plan always fits")  # checked above


def _backtrack(picks, units: int, fixed_bytes: int) -> tuple[dict[str, str], int, float]:
    types, size, total = {}, fixed_bytes, 0.0
    for name, options, pick, unit, base in reversed(picks):
        kind, (nbytes, cost) = options[pick[units]]
        types[name], size, total = kind, size + nbytes, total + cost
        units -= int((nbytes - base) // unit)
    return types, size, total


def budget_plan(model_dir: Path, spec, work: Path, imatrix: dict | None, calibration) -> dict:
    """The plan for spec.max_size_mb on `model_dir`: the Fisher pass, the damage of every
    candidate type per tensor, the allocation (types per tensor, predicted bytes and KL)."""
    from edgellm.artifacts import sha256_json
    from edgellm.export.gguf_float import f32_intermediate
    from edgellm.export.gguf_sensitivity import FISHER_WINDOWS, damage_table, fisher_columns

    f32 = f32_intermediate(model_dir, work)
    key = sha256_json([calibration.text, calibration.seqlen, FISHER_WINDOWS])[:12]
    fisher = fisher_columns(model_dir, calibration.text, calibration.seqlen,
                            work / f"fisher-columns-{key}.npz")
    table, fixed = damage_table(f32, fisher, tuple(spec.candidates), work, imatrix)
    types, size, damage = allocate(table, fixed, int(spec.max_size_mb * 1e6),
                                   gguf.GGUF_DEFAULT_ALIGNMENT)
    return {"max_size_mb": spec.max_size_mb, "candidates": list(spec.candidates),
            "predicted_bytes": size, "predicted_kl": damage, "tensor_types": types}


def plan_modules(model_dir: Path, record: dict) -> dict[str, str]:
    """{HF module: ggml type} of the plan's matrices that are weights of the HF folder."""
    from safetensors import safe_open

    from edgellm.export.imatrix import gguf_name_map

    name_map, modules = gguf_name_map(model_dir), {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                target = name_map.get_name(name, try_suffixes=(".weight",))
                if name.endswith(".weight") and target in record["tensor_types"]:
                    modules[name.removesuffix(".weight")] = record["tensor_types"][target]
    return modules


def carried_plan(model_dir: Path, spec) -> dict | None:
    """The plan a GPTQ checkpoint was solved for under this budget (its linears sit on the
    plan's grids), None for other folders; refused when it was another budget's."""
    from edgellm.gptq_checkpoint import gptq_config

    config = json.loads((Path(model_dir) / "config.json").read_text())
    record = (gptq_config(config) or {}).get("edgellm_tensor_types")
    if record is None:
        return None
    if (record["max_size_mb"], record["candidates"]) != (spec.max_size_mb, list(spec.candidates)):
        raise UserError(f"{model_dir} was solved by GPTQ for max_size_mb {record['max_size_mb']} "
                        f"with candidates {', '.join(record['candidates'])}: export it with "
                        "those, or run GPTQ again for this budget")
    return record


def export_budget_gguf(model_dir: Path, target: Path, spec, work: Path, imatrix: dict | None,
                       calibration) -> Path:
    """The whole budget export: the plan (carried by a GPTQ checkpoint solved for it, or
    worked out here), llama.cpp's file with one type per tensor, GPTQ's own blocks in place
    of every matrix it solved, and the plan beside the file."""
    from edgellm.export.gguf import check_exportable, check_loads, quantize_gguf
    from edgellm.export.gguf_float import f32_intermediate
    from edgellm.export.gguf_gptq import carry_gptq_blocks
    from edgellm.gptq_checkpoint import is_gptq_folder

    check_exportable(model_dir)
    record = carried_plan(model_dir, spec) or budget_plan(model_dir, spec, work, imatrix,
                                                          calibration)
    f32 = f32_intermediate(model_dir, work)
    quantize_gguf(f32, target, "q8_0", imatrix=imatrix, tensor_types=record["tensor_types"])
    record = {**record, "gptq_tensors": 0}
    if is_gptq_folder(model_dir):
        record["gptq_tensors"] = carry_gptq_blocks(model_dir, target, f32)
    budget, written = int(spec.max_size_mb * 1e6), target.stat().st_size
    if written > budget:  # the plan's bytes are exact; a file that disagrees is refused
        target.unlink()
        raise UserError(f"the GGUF came to {written} bytes for a plan of "
                        f"{record['predicted_bytes']} within {budget}: please report it")
    (target.parent / ALLOCATION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    check_loads(target, work / f"load-{target.stem}.log")
    return target
