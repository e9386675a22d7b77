"""Auto choice: export every candidate weight type of one format, measure those that fit
the size budget, and keep the one that meets the budgets best, with the evidence in a report.

Under a size budget alone, the choice is the best perplexity that fits; with a perplexity
budget, it is the smallest file within it. The candidates (the format's `auto_candidates`
unless the user lists them) are built and measured by the ordinary pipeline in each
format's own runtime (in OUT, so a second budget reuses every build and measurement), and
the report of the run says which was chosen and why. Under a size budget the candidates
also include "mixed" where the format plans a type per tensor (GGUF, ONNX, MLX: a budget
variant, export/*_budget.py), measured beside the single types like any other.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from edgellm.errors import UserError
from edgellm.export.budget_spec import MIXED  # the candidate with a type per tensor


class NoCandidateFits(UserError):
    """No candidate meets the budgets: exit 1, like a broken gate budget."""

    exit_code = 1


def choose(model: str, to: str, out: Path, console: Console, *,
           max_size_mb: float | None, max_ppl_increase_pct: float | None,
           target_bpw: float | None = None, candidates: list[str] | None = None,
           text: str = "wikitext-2-raw-test", max_tokens: int = 16384, ctx: int = 512,
           allow_pickle: bool = False, force: bool = False) -> tuple[Path, dict]:
    """Build and measure the candidates of format `to` into `out`; return the path of the
    chosen artifact (a GGUF linked to `out/chosen-<name>.gguf`; a folder format's folder
    inside its variant) and the choice record. A `target_bpw` is the size budget stated
    per weight: its megabytes are counted on the model's parameters once the run has
    resolved the model (the mixed candidate plans for the bpw itself)."""
    from pydantic import ValidationError

    from edgellm.pipeline import (
        build_in,
        built_size,
        measure_built,
        publish_report,
        run_report,
        skip_built,
        start_run,
    )
    from edgellm.recipe import EvalSpec, ModelSpec, Recipe

    sized = max_size_mb is not None or target_bpw is not None
    if not sized and max_ppl_increase_pct is None:
        raise UserError("auto choice needs a budget: pass --max-size-mb (or --target-bpw) "
                        "and/or --max-ppl-increase-pct")
    defaults = default_candidates(to, sized)  # refuses a format without a choice
    weights = candidates or defaults
    if MIXED in weights and not sized:
        raise UserError("--candidates mixed plans a type per tensor for a size: give "
                        "--max-size-mb or --target-bpw")
    try:
        recipe = Recipe(model=ModelSpec(source=model, allow_pickle=allow_pickle),
                        eval=EvalSpec(text=text, max_tokens=max_tokens, ctx=ctx),
                        variant=[candidate_variant(to, w, max_size_mb, target_bpw)
                                 for w in weights])
    except ValidationError as exc:  # an unknown candidate type, a bpw out of range
        raise UserError(_option_problem(exc.errors()[0])) from None

    run = start_run(recipe, out, console, force=force)
    if target_bpw is not None:
        from edgellm.export.budget_spec import bpw_size_mb
        from edgellm.resources import count_parameters

        max_size_mb = bpw_size_mb(target_bpw, count_parameters(run.source.files()))
    for variant in recipe.variant:  # every candidate built; those over the size budget not measured
        key = build_in(run, variant)
        size = built_size(out / variant.name, variant.export)
        if max_size_mb is not None and size / 1e6 > max_size_mb:
            skip_built(run, variant, size, f"{size / 1e6:.1f} MB > budget {_mb(max_size_mb)} MB")
        else:
            measure_built(run, variant, key)
    report = run_report(run)
    choice = pick(report["variants"][1:], max_size_mb, max_ppl_increase_pct, target_bpw)
    report["choice"] = choice
    publish_report(report, run)
    if choice["chosen"] is None:
        raise NoCandidateFits(f"no {to} type fits the budgets ({choice['budget_text']}): "
                              f"see {out / 'report.md'}; raise a budget or add --candidates")
    return _publish_choice(out, report, choice), choice


def _option_problem(error: dict) -> str:
    """A candidate variant's validation error as the CLI option it comes from."""
    message = error["msg"].removeprefix("Value error, ")
    for field in ("target_bpw", "max_size_mb"):
        option = "--" + field.replace("_", "-")
        if message.startswith(field):  # the budget's own check names it first
            return option + message.removeprefix(field)
        if field in error["loc"]:
            return f"{option}: {message}"
    return f"--candidates: {message}"


def default_candidates(to: str, sized: bool) -> list[str]:
    """The format's own candidates, and "mixed" under a size budget where it has one."""
    from edgellm.export.formats import auto_targets, format_of

    fmt = format_of(to)
    if not fmt.auto_candidates:
        raise UserError(f"--max-size-mb/--target-bpw/--max-ppl-increase-pct choose a weight "
                        f"type in {', '.join(auto_targets())}: not --to {to}")
    mixed = [MIXED] if sized and MIXED in fmt.weights else []
    return [*fmt.auto_candidates, *mixed]


def candidate_variant(to: str, weights: str, max_size_mb: float | None,
                      target_bpw: float | None = None):
    """The variant that builds one candidate: a single type, or a type per tensor within
    the size budget (named by it, so each budget keeps its own)."""
    from edgellm.recipe import ExportSpec, VariantSpec

    if weights == MIXED and target_bpw is not None:
        return VariantSpec(name=f"{to}-{MIXED}-{target_bpw:g}bpw",
                           export=ExportSpec(format=to, target_bpw=target_bpw))
    if weights == MIXED:
        return VariantSpec(name=f"{to}-{MIXED}-{max_size_mb:g}mb",
                           export=ExportSpec(format=to, max_size_mb=max_size_mb))
    return VariantSpec(name=f"{to}-{weights}", export=ExportSpec(format=to, weights=weights))


def pick(rows: list[dict], max_size_mb: float | None,
         max_ppl_increase_pct: float | None, target_bpw: float | None = None) -> dict:
    """The choice among measured rows, with the rule that made it (a `target_bpw` is
    stated beside the size it comes to)."""
    per_weight = f" ({target_bpw:g} bpw)" if target_bpw is not None else ""
    budget = [f"size ≤ {_mb(max_size_mb)} MB{per_weight}" if max_size_mb is not None else "",
              f"Δppl ≤ +{max_ppl_increase_pct:g}%" if max_ppl_increase_pct is not None else ""]
    budget_text = ", ".join(b for b in budget if b)
    fits = [r for r in rows
            if (max_size_mb is None or r["size_bytes"] / 1e6 <= max_size_mb)
            and (max_ppl_increase_pct is None or r["ppl_delta_pct"] <= max_ppl_increase_pct)]
    if max_ppl_increase_pct is not None:
        rule, best = "the smallest file within the budgets", min(
            fits, key=lambda r: r["size_bytes"], default=None)
    else:
        rule, best = "the lowest perplexity within the size budget", min(
            fits, key=lambda r: r["ppl"], default=None)
    return {"chosen": best["name"] if best else None,
            "weights": best["weights"] if best else None,
            "rule": rule, "budget_text": budget_text, "max_size_mb": max_size_mb,
            "target_bpw": target_bpw,
            "max_ppl_increase_pct": max_ppl_increase_pct,
            "fitting": [r["name"] for r in fits]}


def _mb(size_mb: float) -> str:
    """A budget in MB as the user gave it, or to 0.1 MB where it was worked out from a bpw."""
    return f"{size_mb:g}" if round(size_mb, 1) == size_mb else f"{size_mb:.1f}"


def _publish_choice(out: Path, report: dict, choice: dict) -> Path:
    """A chosen GGUF is linked (or copied) to OUT/chosen-<name>.gguf, atomically, and a
    choice an earlier budget made is removed; a folder format's chosen folder is its
    variant's own (report.md names it)."""
    import shutil

    from edgellm.artifacts import atomic_path

    row = next(r for r in report["variants"] if r["name"] == choice["chosen"])
    source = out / row["path"]
    for stale in out.glob("chosen-*.gguf"):
        stale.unlink()
    if not source.is_file():
        return source
    target = out / f"chosen-{row['name']}{source.suffix}"
    with atomic_path(target) as tmp:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    return target
