"""GGUF: one file llama.cpp (and every app built on it) loads; written by export/gguf.py,
or under a size budget by export/gguf_budget.py (one type per tensor)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edgellm.artifacts import sha256_json
from edgellm.export.formats import Format
from edgellm.export.gguf import BUDGET_TYPES, FLOAT_TYPES, GGUF_WEIGHTS

MIXED = "mixed"  # the weights of a budget export: a type per tensor
# per-tensor candidates: llama.cpp's symmetric types and k-quants; q4_1/q5_1 left out by
# default (the built-in SmolLM2 ships Q4_1-rounded, which they would recover exactly)
BUDGET_CANDIDATES = ("q3_k", "q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0")


class GgufFormat(Format):
    name = "gguf"
    summary = "llama.cpp"
    weights = (*GGUF_WEIGHTS, MIXED)
    lossless = "f16"
    runtimes = ("llama.cpp",)
    # llama-cpp-python: its quantizer and the converter extracted from its sdist
    build_tools = ("torch", "transformers", "gguf", "llama-cpp-python")
    memory_factor = 2.5
    options = ("imatrix", "max_size_mb", "target_bpw", "candidates")
    artifact = "model.gguf"

    def complete(self, spec) -> None:
        """A budget chooses the types (weights "mixed") and weighs by an importance matrix."""
        if has_budget(spec):
            if "weights" not in spec.model_fields_set:
                spec.weights = MIXED
            if "imatrix" not in spec.model_fields_set:
                spec.imatrix = True
            if spec.candidates is None:
                spec.candidates = list(BUDGET_CANDIDATES)

    def check_spec(self, spec) -> str | None:
        budget = "target_bpw" if spec.target_bpw is not None else "max_size_mb"
        if spec.max_size_mb is not None and spec.target_bpw is not None:
            return "max_size_mb and target_bpw are the same budget: give one of them"
        if has_budget(spec) and spec.weights != MIXED:
            return f"{budget} chooses a type per tensor: leave weights out (not '{spec.weights}')"
        if spec.weights == MIXED and not has_budget(spec):
            return "weights 'mixed' needs max_size_mb or target_bpw, the budget the types are chosen for"
        if has_budget(spec) and not spec.imatrix:
            return f"{budget} weighs rounding by an importance matrix: leave imatrix out"
        if spec.candidates is not None:
            if not has_budget(spec):
                return "candidates only apply with max_size_mb or target_bpw"
            unknown = [c for c in spec.candidates if c not in BUDGET_TYPES]
            if unknown or not spec.candidates:
                return (f"candidates {', '.join(unknown) or '(none)'}: choose among "
                        f"{', '.join(BUDGET_TYPES)}")
        if spec.target_bpw is not None:
            return check_bpw(spec.target_bpw, spec.candidates)
        if spec.imatrix and spec.weights in FLOAT_TYPES:
            return "imatrix only applies to quantized gguf weights (q8_0, q4_k_m, ...)"
        return None

    def resolve_budget(self, spec, params: int) -> None:
        """target_bpw → max_size_mb: the file's bits over the model's parameters."""
        if spec.target_bpw is not None:
            spec.max_size_mb = spec.target_bpw * params / 8 / 1e6

    def check_size(self, spec, params: int) -> str | None:
        """No file is smaller than every weight in the smallest candidate type."""
        if spec.max_size_mb is None:
            return None
        bpw = candidate_bpw(spec.candidates)
        smallest = min(bpw, key=bpw.get)
        floor = params * bpw[smallest] / 8
        if spec.max_size_mb * 1e6 < floor:
            return (f"max_size_mb {spec.max_size_mb:g} is below the smallest GGUF of this model "
                    f"(at least {floor / 1e6:.1f} MB: every weight in {smallest}): raise it")
        return None

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

        record = budget_plan(model_dir, spec, work, imatrix_for(model_dir, work, calibration),
                             calibration)
        return {"modules": plan_modules(model_dir, record), "record": record}

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        from edgellm.export.gguf import export_gguf

        imatrix = imatrix_for(model_dir, work, calibration) if spec.imatrix else None
        if spec.max_size_mb is not None:
            from edgellm.export.gguf_budget import export_budget_gguf

            return export_budget_gguf(model_dir, self.artifact_path(staging), spec, work,
                                      imatrix, calibration)
        return export_gguf(model_dir, self.artifact_path(staging), spec.weights, work, imatrix)


def imatrix_for(model_dir: Path, work: Path, calibration) -> dict:
    """llama.cpp's importance matrix of `model_dir` on the calibration text, cached in `work`."""
    from edgellm.export.imatrix import compute_imatrix

    key = sha256_json(calibration.model_dump())[:12]
    return compute_imatrix(model_dir, calibration.text, calibration.samples, calibration.seqlen,
                           work / f"imatrix-{key}.npz")


FORMAT = GgufFormat()


def has_budget(spec) -> bool:
    return spec.max_size_mb is not None or spec.target_bpw is not None


def candidate_bpw(candidates) -> dict[str, float]:
    """Bits per weight of each candidate type, block scales included (ggml's block sizes)."""
    import gguf

    return {c: 8 * size / block for c in candidates
            for block, size in [gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[c.upper()]]]}


def check_bpw(target: float, candidates) -> str | None:
    """A target_bpw the candidate types can reach: between the smallest and the largest."""
    bpw = candidate_bpw(candidates)
    low, high = min(bpw, key=bpw.get), max(bpw, key=bpw.get)
    if target < bpw[low]:
        return (f"target_bpw {target:g} is below the smallest candidate type ({low}: "
                f"{bpw[low]:.2f} bpw): raise it or add a smaller candidate")
    if target > bpw[high] + 0.5:  # the file's norms and vocabulary add a little
        return (f"target_bpw {target:g} is above the largest candidate type ({high}: "
                f"{bpw[high]:.2f} bpw): lower it, or export weights {high} or f16")
    return None
