"""GGUF: one file llama.cpp (and every app built on it) loads; written by export/gguf.py,
or under a size budget by export/gguf_budget.py (one type per tensor)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edgellm.artifacts import sha256_json
from edgellm.export.budget_spec import (
    MIXED,
    budget_problem,
    complete_budget,
    has_budget,
)
from edgellm.export.formats import Format
from edgellm.export.gguf import BUDGET_TYPES, FLOAT_TYPES, GGUF_WEIGHTS

# per-tensor candidates: llama.cpp's symmetric types and k-quants; q4_1/q5_1 left out by
# default (the built-in SmolLM2 ships Q4_1-rounded, which they would recover exactly)
BUDGET_CANDIDATES = ("q3_k", "q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")


class GgufFormat(Format):
    name = "gguf"
    summary = "llama.cpp"
    weights = (*GGUF_WEIGHTS, MIXED)
    lossless = "f16"
    auto_candidates = ("f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")
    budget_artifact = "GGUF"  # what a size budget's floor names
    runtimes = ("llama.cpp",)
    # llama-cpp-python: its quantizer and the converter extracted from its sdist
    build_tools = ("torch", "transformers", "gguf", "llama-cpp-python")
    memory_factor = 2.5
    options = ("imatrix", "max_size_mb", "target_bpw", "candidates")
    artifact = "model.gguf"

    def complete(self, spec) -> None:
        """A budget chooses the types (weights "mixed") and weighs by an importance matrix."""
        complete_budget(spec, BUDGET_CANDIDATES)
        if has_budget(spec) and "imatrix" not in spec.model_fields_set:
            spec.imatrix = True

    def check_spec(self, spec) -> str | None:
        problem = budget_problem(spec, tuple(BUDGET_TYPES), candidate_bpw)
        if problem:
            return problem
        if has_budget(spec) and not spec.imatrix:
            budget = "target_bpw" if spec.target_bpw is not None else "max_size_mb"
            return f"{budget} weighs rounding by an importance matrix: leave imatrix out"
        if spec.imatrix and spec.weights in FLOAT_TYPES:
            return "imatrix only applies to quantized gguf weights (q8_0, q4_k_m, ...)"
        return None

    def candidate_bpw(self, candidates, spec) -> dict[str, float]:
        return candidate_bpw(candidates)

    def bits_per_weight(self, weights: str) -> float:
        return 9.0 if weights == MIXED else super().bits_per_weight(weights)  # at most q8_0

    def intermediate_bytes(self, params: int, weights: str) -> int:
        return 0 if weights in FLOAT_TYPES else params * 4  # the f32 GGUF quantizing starts from

    def opens_source(self, source) -> Path | None:
        return Path(source.path) / source.gguf_file if source.kind == "gguf" else None

    def describe(self, artifact: Path) -> dict:
        """Tensors and bytes per ggml type, read from the file; a budget's prediction."""
        from edgellm.export.gguf_budget import ALLOCATION_FILE
        from edgellm.gguf_bounds import read_gguf_meta

        storage = read_gguf_meta(artifact).storage.values()
        counts, sizes = Counter(kind for kind, _ in storage), Counter()
        for kind, nbytes in storage:
            sizes[kind] += nbytes
        row = {"tensor_types": {k: {"tensors": counts[k], "bytes": sizes[k]}
                                for k in sorted(counts, key=lambda k: -sizes[k])}}
        plan = artifact.parent / ALLOCATION_FILE
        if plan.is_file():
            record = json.loads(plan.read_text())
            row["predicted_kl"] = record["predicted_kl"]
            row["max_size_mb"] = record["max_size_mb"]
        return row

    def tensor_plan(self, model_dir: Path, spec, work: Path, calibration) -> dict | None:
        if spec.max_size_mb is None:
            return None
        from edgellm.export.gguf_budget import budget_plan, plan_modules

        imatrix = imatrix_for(model_dir, work, calibration, with_fisher=True)
        record = budget_plan(model_dir, spec, work, imatrix, calibration)
        return {"modules": plan_modules(model_dir, record), "record": record, "imatrix": imatrix}

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        from edgellm.export.gguf import export_gguf
        from edgellm.gptq_checkpoint import read_plan_imatrix

        imatrix = None
        if spec.imatrix:  # under a budget, a checkpoint solved for it carries the plan's
            carried = read_plan_imatrix(model_dir) if spec.max_size_mb is not None else None
            imatrix = carried or imatrix_for(model_dir, work, calibration,
                                             with_fisher=plans_here(model_dir, spec))
        if spec.max_size_mb is not None:
            from edgellm.export.gguf_budget import export_budget_gguf

            return export_budget_gguf(model_dir, self.artifact_path(staging), spec, work,
                                      imatrix, calibration)
        return export_gguf(model_dir, self.artifact_path(staging), spec.weights, work, imatrix)


def imatrix_for(model_dir: Path, work: Path, calibration, with_fisher: bool = False) -> dict:
    """llama.cpp's importance matrix of `model_dir` on the calibration text, cached in `work`;
    `with_fisher`: a budget plan follows, whose Fisher pass shares the matrix's pass."""
    from edgellm.export.fisher import fisher_cache
    from edgellm.export.imatrix import compute_imatrix

    key = sha256_json(calibration.model_dump())[:12]
    return compute_imatrix(model_dir, calibration.text, calibration.samples, calibration.seqlen,
                           work / f"imatrix-v2-{key}.npz",  # v2: with the logits' matrix
                           fisher_cache(calibration, work) if with_fisher else None)


def plans_here(model_dir: Path, spec) -> bool:
    """Whether a budget export works its plan out (no checkpoint solved for it carries one)."""
    from edgellm.export.allocation import carried_plan

    return spec.max_size_mb is not None and carried_plan(model_dir, spec) is None


FORMAT = GgufFormat()


def candidate_bpw(candidates) -> dict[str, float]:
    """Bits per weight of each candidate type, block scales included (ggml's block sizes)."""
    import gguf

    return {c: 8 * size / block for c in candidates
            for block, size in [gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[c.upper()]]]}
