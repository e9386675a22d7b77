"""The report of one run: report.json (the contract in docs/design.md and README), report.md, report.html.

Every number comes from a measurement or from the artifact on disk; nothing is assumed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from edgellm import __version__
from edgellm.artifacts import dir_size
from edgellm.divergence import TAIL_SAMPLES, TOP_K
from edgellm.recipe import ONNX_ONLY, REFERENCE
from edgellm.tools import machine_info, tool_versions

COLUMNS = [  # (key, header, format)
    ("name", "variant", "{}"), ("format", "format", "{}"), ("weights", "weights", "{}"),
    ("runtime", "runtime", "{}"), ("size_mb", "size MB", "{:.1f}"),
    ("compression_ratio", "ratio", "{:.2f}×"), ("bits_per_weight", "bpw", "{:.2f}"),
    ("ppl", "ppl", "{:.4f}"), ("ppl_delta_pct", "Δppl %", "{:+.3f}"),
    ("kl_mean", "KL", "{:.4f}"), ("kl_p99", "KL p99", "{:.3f}"),
    ("top1_agreement", "top-1", "{:.1%}"),
    ("prefill_tps", "prefill tok/s", "{:.1f}"), ("decode_tps", "decode tok/s", "{:.1f}"),
    ("decode_pct_of_ceiling", "% of BW ceiling", "{:.0f}%"),
    ("ttft_ms", "TTFT ms", "{:.0f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("parameters", "params M", "{:.1f}"), ("sparsity", "sparsity", "{:.1%}"),
    ("steps", "steps", "{}"),
]
SCALED = {"parameters": 1e-6}  # shown in millions
SPARSE_NOTE = ("Sparsity is the measured fraction of zeros in the decoder's weight matrices. "
               "Unstructured and N:M zeros are stored densely: torch, llama.cpp and ONNX "
               "Runtime on CPU skip none of them, so those variants keep the dense size and "
               "speed; only structured pruning (depth, width) makes a model smaller and faster.")


BANDWIDTH_NOTE = ("Memory bandwidth {:.1f} GB/s (a 256 MB copy, read + write, measured at the "
                  "end of this run). Decoding a token reads every weight once, so bandwidth ÷ "
                  "file size bounds decode speed; '% of BW ceiling' is each variant's decode "
                  "tok/s against that bound.")


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or value == []:
        return "–"
    if isinstance(value, list):
        return " → ".join(map(str, value))
    return fmt.format(value * SCALED.get(key, 1))


@dataclass
class VariantResult:
    name: str
    export: object
    steps: list[str]
    artifact: Path
    measured: dict
    manifest: dict = field(default_factory=dict)


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".onnx", ".data", ".ort")


def artifact_size(path: Path) -> int:
    """Bytes a user ships: the file (with ONNX external data), or a folder's model files
    (not tokenizer or configs)."""
    if path.is_file():
        external = path.with_name(path.name + ".data")  # ONNX weights stored beside the graph
        return path.stat().st_size + (external.stat().st_size if external.is_file() else 0)
    return dir_size(path, WEIGHT_SUFFIXES)


def model_stats(model_dir: Path) -> dict:
    """Parameters, and the measured sparsity of the decoder's weight matrices (the fraction
    that is exactly zero; None for a packed GPTQ checkpoint, whose zeros mean nothing)."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    bits = (config.get("quantization_config") or {}).get("bits")
    total, zeros, matrix_total = 0, 0, 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                if name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue
                shape = handle.get_slice(name).get_shape()
                if name.endswith(".qweight") and bits:
                    total += _numel(shape) * 32 // bits
                elif not name.endswith((".qzeros", ".scales", ".g_idx")):
                    total += _numel(shape)
                if name.startswith("model.layers.") and name.endswith(".weight") and len(shape) == 2:
                    tensor = handle.get_tensor(name)
                    zeros += int((tensor == 0).sum())
                    matrix_total += tensor.numel()
    sparsity = zeros / matrix_total if matrix_total and not bits else None
    return {"parameters": total, "sparsity": sparsity}


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


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
    }


def _export_options(export) -> dict:
    """The options the artifact was written with (MatMulNBits block size, accuracy_level...)."""
    exclude = set() if export.format in ("onnx", "ort") else set(ONNX_ONLY)
    return export.model_dump(exclude=exclude)


def markdown_table(variants: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in variants:
        cells = [cell(row, key, fmt) for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CONSOLE_COLUMNS = ("name", "weights", "size_mb", "bits_per_weight", "ppl", "ppl_delta_pct",
                   "decode_tps", "peak_rss_mb")


def rich_table(variants: list[dict]):
    """The terminal summary: fewer columns than report.md so it fits 80 characters."""
    from rich.table import Table

    columns = [c for c in COLUMNS if c[0] in CONSOLE_COLUMNS]
    table = Table(*(header for _, header, _ in columns))
    table.columns[0].no_wrap = True
    for row in variants:
        table.add_row(*(cell(row, key, fmt) for key, _, fmt in columns))
    return table


def bos_note(ev: dict) -> str:
    bos = ev.get("bos") or {}
    return f", each starting with BOS (id {bos['id']}) as the tokenizer adds it" \
        if bos.get("added") else ""


def render_markdown(report: dict) -> str:
    ev, machine = report["eval"], report["machine"]
    return "\n".join([
        f"# edgellm report: {report['model']['source']}",
        "",
        markdown_table(report["variants"]),
        "",
        f"Perplexity on `{ev['text']}` (sha256 `{ev['sha256'][:16]}…`), {ev['tokens_scored']} "
        f"scored tokens in {ev['windows']} windows of {ev['ctx']}"
        f"{bos_note(ev)}; every runtime scored the same token ids. Δppl is against the torch "
        "fp32 reference. KL is the mean KL "
        "divergence (nats) of each variant's next-token distribution from the reference's "
        f"(exact over the reference's top {TOP_K} tokens, the rest estimated from "
        f"{TAIL_SAMPLES} sampled tokens per position); KL p99 its 99th percentile over "
        "positions; top-1 the share of positions where the variant's most likely token is "
        "the reference's.",
        f"Latency: prefill of one {ev['ctx']}-token prompt, then {ev['decode_tokens']} greedy "
        f"tokens with a KV cache; {machine['threads']} threads, OMP_WAIT_POLICY="
        f"{machine['omp_wait_policy']}; each variant measured in its own process.",
        f"Machine: {machine['cpu']}, {machine['physical_cores']} cores, "
        f"{machine['memory_gb']} GB, {machine['os']}, Python {machine['python']}.",
        *([BANDWIDTH_NOTE.format(machine["memory_bandwidth_gbs"])]
          if machine.get("memory_bandwidth_gbs") else []),
        *([SPARSE_NOTE] if any((row.get("sparsity") or 0) >= 0.01 for row in report["variants"])
          else []),
        *_choice_lines(report),
        "",
    ])


def _choice_lines(report: dict) -> list[str]:
    """What `edgellm export --max-size-mb …` chose, and what it did not measure, and why."""
    lines = []
    if report.get("not_measured"):
        lines.append("Not measured: " + "; ".join(
            f"{r['name']} ({r['reason']})" for r in report["not_measured"]) + ".")
    choice = report.get("choice")
    if choice and choice["chosen"]:
        lines.append(f"Chosen: {choice['chosen']}, {choice['rule']} ({choice['budget_text']}); "
                     f"within the budgets: {', '.join(choice['fitting'])}.")
    elif choice:
        lines.append(f"Chosen: none: no candidate meets {choice['budget_text']}.")
    return lines
