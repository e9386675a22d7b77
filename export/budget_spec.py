"""The rules of a size budget in an ExportSpec, shared by every format that takes one
(GGUF, ONNX, MLX): `max_size_mb` or `target_bpw` (one of them), weights "mixed", `candidates`
among the format's types, and the floor and range those candidates allow."""

from __future__ import annotations

MIXED = "mixed"  # the weights of a budget export: a type per tensor


def has_budget(spec) -> bool:
    return spec.max_size_mb is not None or spec.target_bpw is not None


def complete_budget(spec, default_candidates: tuple[str, ...]) -> None:
    """A budget chooses the types: weights "mixed", the format's default candidates."""
    if has_budget(spec):
        if "weights" not in spec.model_fields_set:
            spec.weights = MIXED
        if spec.candidates is None:
            spec.candidates = list(default_candidates)


def budget_problem(spec, known: tuple[str, ...], bpw_of) -> str | None:
    """What is wrong with a spec's budget fields, or None; `known` the candidate types the
    format offers, `bpw_of(candidates)` their bits per weight."""
    budget = "target_bpw" if spec.target_bpw is not None else "max_size_mb"
    if spec.max_size_mb is not None and spec.target_bpw is not None:
        return "max_size_mb and target_bpw are the same budget: give one of them"
    if has_budget(spec) and spec.weights != MIXED:
        return f"{budget} chooses a type per tensor: leave weights out (not '{spec.weights}')"
    if spec.weights == MIXED and not has_budget(spec):
        return "weights 'mixed' needs max_size_mb or target_bpw, the budget the types are chosen for"
    if spec.candidates is not None:
        if not has_budget(spec):
            return "candidates only apply with max_size_mb or target_bpw"
        unknown = [c for c in spec.candidates if c not in known]
        if unknown or not spec.candidates:
            return (f"candidates {', '.join(unknown) or '(none)'}: choose among "
                    f"{', '.join(known)}")
    if spec.target_bpw is not None:
        return check_bpw(spec.target_bpw, bpw_of(spec.candidates))
    return None


def check_bpw(target: float, bpw: dict[str, float]) -> str | None:
    """A target_bpw the candidate types can reach: between the smallest and the largest."""
    low, high = min(bpw, key=bpw.get), max(bpw, key=bpw.get)
    if target < bpw[low]:
        return (f"target_bpw {target:g} is below the smallest candidate type ({low}: "
                f"{bpw[low]:.2f} bpw): raise it or add a smaller candidate")
    if target > bpw[high] + 0.5:  # the file's norms and vocabulary add a little
        return (f"target_bpw {target:g} is above the largest candidate type ({high}: "
                f"{bpw[high]:.2f} bpw): lower it, or export weights {high} or a float type")
    return None


def bpw_size_mb(target_bpw: float, params: int) -> float:
    """The size budget, in MB, of a file of `target_bpw` bits per parameter."""
    return target_bpw * params / 8 / 1e6


def resolve_bpw(spec, params: int) -> None:
    """target_bpw → max_size_mb: the file's bits over the model's parameters."""
    if spec.target_bpw is not None:
        spec.max_size_mb = bpw_size_mb(spec.target_bpw, params)


def size_floor_problem(spec, params: int, bpw: dict[str, float], what: str) -> str | None:
    """No file is smaller than every weight in the smallest candidate type."""
    if spec.max_size_mb is None:
        return None
    smallest = min(bpw, key=bpw.get)
    floor = params * bpw[smallest] / 8
    if spec.max_size_mb * 1e6 < floor:
        return (f"max_size_mb {spec.max_size_mb:g} is below the smallest {what} of this model "
                f"(at least {floor / 1e6:.1f} MB: every weight in {smallest}): raise it")
    return None
