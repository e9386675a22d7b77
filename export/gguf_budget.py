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

from edgellm.errors import UserError
from edgellm.export.allocation import allocate, carried_plan

ALLOCATION_FILE = "allocation.json"  # beside the artifact: the plan and its predicted damage


def budget_plan(model_dir: Path, spec, work: Path, imatrix: dict | None, calibration) -> dict:
    """The plan for spec.max_size_mb on `model_dir`: the Fisher pass, the damage of every
    candidate type per tensor, the allocation (types per tensor, predicted bytes and KL)."""
    from edgellm.export.gguf_float import f32_intermediate
    from edgellm.export.gguf_sensitivity import damage_table, fisher_columns

    f32 = f32_intermediate(model_dir, work)
    fisher = fisher_columns(model_dir, calibration, work)
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
