"""Choose one type per tensor within a size budget: the least total predicted damage.

A multiple-choice knapsack: each tensor takes one of its candidate types, whose exact
bytes and predicted damage (KL divergence, additive over tensors) the format's sensitivity
pass measured; the bytes that are not priced tensors are fixed. Dynamic programming over
the room above the smallest file in small units finds the least damage, so a larger budget
never predicts more damage. Shared by the GGUF and ONNX budgets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgellm.errors import UserError

BUDGET_UNITS = 50_000  # the room above the smallest file, in units (see allocate)


def allocate(table: dict[str, dict[str, tuple[int, float]]], fixed_bytes: int,
             budget_bytes: int, align: int = 32, what: str = "GGUF"
             ) -> tuple[dict[str, str], int, float]:
    """({tensor: type}, predicted file bytes, predicted damage) of the least-damage choice
    whose file fits `budget_bytes` (each tensor's data padded to `align`, as GGUF stores
    it); UserError naming the smallest possible `what` file otherwise."""
    names = sorted(n for n in table if table[n])  # a tensor no candidate fits: the format's own
    table = {n: {k: (-(-b // align) * align, d) for k, (b, d) in table[n].items()} for n in names}
    smallest = fixed_bytes + sum(min(b for b, _ in table[n].values()) for n in names)
    if smallest > budget_bytes:
        raise UserError(f"max_size_mb {budget_bytes / 1e6:g} is below the smallest {what} this "
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


def cached_table(path: Path, compute) -> dict:
    """The damage table (with whatever else `compute` returns) stored as JSON at `path`,
    computed once: a second budget on the same model and candidates reuses it."""
    from edgellm.artifacts import atomic_path

    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(value))
    return value


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
