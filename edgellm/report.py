"""The report of one run as data: report.json's rows (the contract in docs/design.md and
README), built from the measurements and the artifacts on disk; report_markdown.py and
report_html.py render it, report_file.py writes and reads it.

Every number comes from a measurement or from the artifact on disk; nothing is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from edgellm import __version__
from edgellm.artifact_stats import artifact_size, model_stats
from edgellm.recipe import REFERENCE
from edgellm.tools import machine_info, tool_versions


@dataclass
class VariantResult:
    name: str
    export: object
    steps: list[str]
    artifact: Path
    measured: dict
    manifest: dict = field(default_factory=dict)


def build_report(recipe, source, eval_input, results: list[VariantResult], out: Path) -> dict:
    from edgellm.bandwidth import copy_bandwidth_gbs, decode_ceiling

    params = model_stats(out / REFERENCE)["parameters"]  # a tied lm_head counted once
    reference = next(r for r in results if r.name == REFERENCE)
    ref_ppl, ref_size = reference.measured["ppl"], artifact_size(reference.artifact)
    variants = [_variant_row(r, out, params, ref_ppl, ref_size) for r in results]
    bandwidth = copy_bandwidth_gbs()
    front = pareto_front(variants)
    for row in variants:
        ceiling = decode_ceiling(bandwidth, row["size_bytes"])
        row["decode_ceiling_tps"] = ceiling
        row["decode_pct_of_ceiling"] = 100 * row["decode_tps"] / ceiling if row["decode_tps"] \
            else None
        row["pareto_front"] = row["name"] in front
    first = results[0].measured
    return {
        "edgellm": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"source": recipe.model.source, "parameters": params,
                  "path": str(source.path)},
        "eval": {"text": recipe.eval.text, "path": str(eval_input.text_path),
                 "sha256": eval_input.text_sha256, "tokens": eval_input.tokens,
                 "tokens_scored": first["tokens_scored"], "ctx": recipe.eval.ctx,
                 "windows": first["windows"], "decode_tokens": recipe.eval.decode_tokens,
                 "bos": {"added": eval_input.bos is not None, "id": eval_input.bos}},
        "machine": {**machine_info(), "threads": first["threads"],
                    "memory_bandwidth_gbs": bandwidth},
        "tools": tool_versions(),
        "variants": variants,
    }


def pareto_front(rows: list[dict], x: str = "size_bytes", y: str = "ppl") -> set[str]:
    """Names of the rows no other row beats on both `x` and `y` (smaller is better): the
    variants worth choosing between."""
    def beats(other: dict, row: dict) -> bool:
        return other[x] <= row[x] and other[y] <= row[y] and (other[x] < row[x] or other[y] < row[y])

    return {row["name"] for row in rows if not any(beats(o, row) for o in rows)}


def _variant_row(result: VariantResult, out: Path, params: int, ref_ppl: float,
                 ref_size: int) -> dict:
    m = result.measured
    size = artifact_size(result.artifact)
    stats = result.manifest.get("model") or {}
    params = stats.get("parameters") or params
    return {
        "name": result.name,
        "format": result.export.format,
        "weights": result.export.weights,
        "runtime": m["runtime"],
        "runtime_version": m["runtime_version"],
        "path": str(result.artifact.relative_to(out)) if result.artifact.is_relative_to(out)
        else str(result.artifact),
        "size_bytes": size,
        "size_mb": size / 1e6,
        "compression_ratio": ref_size / size,
        "bits_per_weight": size * 8 / params,
        "ppl": m["ppl"],
        "ppl_delta_pct": 100 * (m["ppl"] / ref_ppl - 1),
        "kl_mean": m.get("kl_mean"),
        "kl_p99": m.get("kl_p99"),
        "top1_agreement": m.get("top1_agreement"),
        "prefill_tps": m["prefill_tps"],
        "decode_tps": m["decode_tps"],
        "ttft_ms": m["ttft_ms"],
        "peak_rss_mb": m["peak_rss_mb"],
        "threads": m["threads"],
        "omp_wait_policy": m["omp_wait_policy"],
        "greedy_tokens": m["greedy_tokens"],
        "parameters": params,
        "sparsity": stats.get("sparsity"),
        "steps": result.steps,
        "export": _export_options(result.export),
        **_artifact_facts(result),
    }


def _artifact_facts(result: VariantResult) -> dict:
    """What the format reads from the built artifact (GGUF: tensors and bytes per type)."""
    from edgellm.export.formats import format_of

    return format_of(result.export.format).describe(result.artifact) if result.artifact.exists() \
        else {}


def _export_options(export) -> dict:
    """The options the artifact was written with: its format's own (MatMulNBits block size,
    accuracy_level..., GGUF imatrix), not those other formats read."""
    from edgellm.export.formats import formats

    others = {o for f in formats().values() for o in f.options} - set(formats()[export.format].options)
    return export.model_dump(exclude=others)
