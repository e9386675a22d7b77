"""`edgellm compare A/report.json B/report.json`: what changed between two runs, per variant.

The Markdown table is what a CI job posts on a pull request: size, perplexity change and
decode speed of each variant in the base run (A) and the new run (B), and the difference.
Variants only in one run are listed as added or removed.
"""

from __future__ import annotations

from pathlib import Path

from edgellm.report_file import load_report
from edgellm.report_markdown import cell


def compare_reports(base_path: Path, new_path: Path) -> str:
    base, new = load_report(base_path, figures=True), load_report(new_path, figures=True)
    base_rows = {row["name"]: row for row in base["variants"]}
    new_rows = {row["name"]: row for row in new["variants"]}
    names = list(base_rows) + [n for n in new_rows if n not in base_rows]
    lines = [f"Comparing {base_path} (base) with {new_path} (new)", "",
             "| variant | size MB | Δ size | Δppl % (base → new) | decode tok/s (base → new) |",
             "|---|---:|---:|---:|---:|"]
    for name in names:
        a, b = base_rows.get(name), new_rows.get(name)
        if a is None or b is None:
            row = a or b
            state = "added" if a is None else "removed"
            lines.append(f"| {name} ({state}) | {_mb(row)} | | {cell(row, 'ppl_delta_pct', PCT)} | "
                         f"{cell(row, 'decode_tps', TPS)} |")
            continue
        lines.append(f"| {name} | {_mb(a)} → {_mb(b)} | {_size_change(a, b)} | "
                     f"{cell(a, 'ppl_delta_pct', PCT)} → {cell(b, 'ppl_delta_pct', PCT)} | "
                     f"{cell(a, 'decode_tps', TPS)} → {cell(b, 'decode_tps', TPS)} |")
    notes = _protocol_notes(base, new)
    return "\n".join(lines + ([""] + notes if notes else []))


PCT, TPS = "{:+.2f}", "{:.1f}"


def _mb(row: dict) -> str:
    size = row.get("size_bytes")
    return "–" if size is None else f"{size / 1e6:.1f}"


def _size_change(a: dict, b: dict) -> str:
    if not a.get("size_bytes") or b.get("size_bytes") is None:
        return "–"
    return f"{(b['size_bytes'] / a['size_bytes'] - 1) * 100:+.1f}%"


def _protocol_notes(base: dict, new: dict) -> list[str]:
    """Perplexities compare only on the same text and windows: say when they differ."""
    notes = []
    a, b = base.get("eval"), new.get("eval")
    a, b = (a if isinstance(a, dict) else {}), (b if isinstance(b, dict) else {})
    for key in ("sha256", "tokens", "ctx"):
        if a.get(key) != b.get(key):
            notes.append(f"Note: eval {key} differs ({a.get(key)} vs {b.get(key)}): "
                         "perplexities are not directly comparable.")
    return notes
