"""A GGUF under a size budget: one llama.cpp type per tensor, chosen to minimise the
predicted KL divergence (export/gguf_sensitivity.py) with the whole file within the budget.

The choice is a multiple-choice knapsack over the matrices (vectors stay f32, as llama.cpp
keeps them): each tensor takes one of its candidate types, whose exact bytes are known
from the sensitivity pass, and every byte of the file that is not a matrix (metadata,
vocabulary, norms, alignment) is counted as measured from a file llama.cpp wrote. Dynamic
programming over the budget in small units finds the least total predicted damage, so a
larger budget never predicts more damage. llama.cpp's quantizer then writes the file with
one --tensor-type override per tensor, with the same importance matrix.
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


def write_budget_gguf(f32_gguf: Path, out_path: Path, spec, table: dict, fixed: int,
                      imatrix: dict | None) -> dict:
    """Write the GGUF of the least predicted damage within spec.max_size_mb; returns the
    allocation record (types per tensor, predicted bytes and KL)."""
    from edgellm.export.gguf import quantize_gguf

    budget = int(spec.max_size_mb * 1e6)
    types, size, damage = allocate(table, fixed, budget, gguf.GGUF_DEFAULT_ALIGNMENT)
    quantize_gguf(f32_gguf, out_path, "q8_0", imatrix=imatrix, tensor_types=types)
    written = out_path.stat().st_size
    if written > budget:  # the plan's bytes are exact; a llama.cpp that disagrees is refused
        out_path.unlink()
        raise UserError(f"llama.cpp wrote {written} bytes for a plan of {size} within "
                        f"{budget}: please report it")
    return {"max_size_mb": spec.max_size_mb, "candidates": list(spec.candidates),
            "predicted_bytes": size, "predicted_kl": damage, "tensor_types": types}


def export_budget_gguf(model_dir: Path, target: Path, spec, work: Path, imatrix: dict | None,
                       calibration) -> Path:
    """The whole budget export: the f32 GGUF, the Fisher pass, the damage of every candidate
    type per tensor, the allocation, llama.cpp's file, and the plan beside it."""
    from edgellm.artifacts import sha256_json
    from edgellm.export.gguf import check_exportable, check_loads
    from edgellm.export.gguf_float import f32_intermediate
    from edgellm.export.gguf_sensitivity import FISHER_WINDOWS, damage_table, fisher_columns

    check_exportable(model_dir)
    f32 = f32_intermediate(model_dir, work)
    key = sha256_json([calibration.text, calibration.seqlen, FISHER_WINDOWS])[:12]
    fisher = fisher_columns(model_dir, calibration.text, calibration.seqlen,
                            work / f"fisher-columns-{key}.npz")
    table, fixed = damage_table(f32, fisher, tuple(spec.candidates), work, imatrix)
    record = write_budget_gguf(f32, target, spec, table, fixed, imatrix)
    (target.parent / ALLOCATION_FILE).write_text(json.dumps(record, indent=1) + "\n")
    check_loads(target, work / f"load-{target.stem}.log")
    return target
