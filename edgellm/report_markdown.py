"""report.md and the terminal table: the report's rows rendered as text (report_html.py
draws the same rows as HTML)."""

from __future__ import annotations

from edgellm.divergence import TAIL_SAMPLES, TOP_K

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
        *_tensor_type_lines(report),
        *_choice_lines(report),
        "",
    ])


def _tensor_type_lines(report: dict) -> list[str]:
    """Per-tensor types of each variant whose types were chosen under a size budget: how
    many tensors and MB of the file each type holds, read from the file."""
    lines = []
    for row in report["variants"]:
        if row.get("predicted_kl") is None or not row.get("tensor_types"):
            continue
        parts = ", ".join(f"{kind} {v['tensors']} ({v['bytes'] / 1e6:.1f} MB)"
                          for kind, v in row["tensor_types"].items())
        lines.append(f"Tensor types of {row['name']} (chosen for ≤ {row['max_size_mb']:.4g} MB, "
                     f"predicted KL {row['predicted_kl']:.4f}): {parts}.")
    return lines


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
