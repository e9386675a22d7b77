"""report.html: one self-contained page (inline SVG plots and script, nothing fetched at view
time): the variants table (click a header to sort), size vs perplexity with the Pareto
front marked, decode speed against each variant's memory-bandwidth ceiling, and the
machine and protocol notes."""

from __future__ import annotations

import html
import io

from edgellm.report_markdown import COLUMNS, cell, render_markdown

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3;cursor:pointer;user-select:none}
td:first-child{text-align:left}tr.front td:first-child{font-weight:bold}
th.asc::after{content:" ▲"}th.desc::after{content:" ▼"}figure{display:inline-block;margin:1em}"""

# Sort the table by a header's column when it is clicked (again: the other way). Numbers
# are compared as numbers ("+4.9", "91.7", "62%", "1.85×"); "–" (not measured) sorts last.
# `#sort=<header>` in the address sorts on load (used by the headless-browser test).
SCRIPT = """
function sortBy(th, descending) {
  const table = th.closest('table'), body = table.tBodies[0];
  const index = [...th.parentNode.children].indexOf(th);
  const key = tr => { const t = tr.children[index].textContent.trim();
    const n = parseFloat(t.replace(/[+×%,]/g, ''));
    return t === '–' ? null : (isNaN(n) ? t : n); };
  const rows = [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === null) return 1; if (y === null) return -1;
    const order = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
    return descending ? -order : order; });
  rows.forEach(r => body.appendChild(r));
  table.querySelectorAll('th').forEach(h => h.classList.remove('asc', 'desc'));
  th.classList.add(descending ? 'desc' : 'asc');
}
document.querySelectorAll('#variants th').forEach(th =>
  th.addEventListener('click', () => sortBy(th, th.classList.contains('asc'))));
const wanted = decodeURIComponent((location.hash.match(/sort=([^&]+)/) || [])[1] || '');
document.querySelectorAll('#variants th').forEach(th => {
  if (th.textContent === wanted) sortBy(th, false); });
"""


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plottable(value) -> bool:
    """A figure a chart can place (a report may hold null, NaN or infinity)."""
    import math

    return isinstance(value, int | float) and math.isfinite(value)


def size_quality_svg(variants: list[dict]) -> str:
    """Size vs perplexity; the Pareto front (nothing both smaller and better) joined."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    variants = [r for r in variants if _plottable(r.get("size_mb")) and _plottable(r.get("ppl"))]
    for row in variants:
        on_front = row.get("pareto_front")
        ax.scatter(row["size_mb"], row["ppl"], s=50 if on_front else 30,
                   color="tab:red" if on_front else "tab:gray", zorder=3)
        ax.annotate(row["name"], (row["size_mb"], row["ppl"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    front = sorted((r for r in variants if r.get("pareto_front")), key=lambda r: r["size_mb"])
    if len(front) > 1:
        ax.plot([r["size_mb"] for r in front], [r["ppl"] for r in front], color="tab:red",
                linewidth=1, label="Pareto front", zorder=2)
        ax.legend(loc="upper right")
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("size vs quality")
    ax.grid(alpha=0.3)
    return _svg(fig)


def decode_ceiling_svg(variants: list[dict]) -> str:
    """Decode tok/s per variant as bars, each with its memory-bandwidth ceiling marked."""
    plt = _pyplot()
    rows = [r for r in variants if _plottable(r.get("decode_tps")) and r["decode_tps"] > 0]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    names = [r["name"] for r in rows]
    ax.barh(names, [r["decode_tps"] for r in rows], color="tab:blue", label="decode tok/s")
    ceilings = [r.get("decode_ceiling_tps") for r in rows]
    if all(_plottable(c) for c in ceilings) and all(
            _plottable(r.get("decode_pct_of_ceiling")) for r in rows):
        ax.scatter(ceilings, names, marker="|", s=300, color="black",
                   label="bandwidth ceiling", zorder=3)
        for row in rows:
            ax.annotate(f"{row['decode_pct_of_ceiling']:.0f}%", (row["decode_tps"], row["name"]),
                        textcoords="offset points", xytext=(4, -3), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens per second")
    ax.set_title("decode speed vs memory-bandwidth ceiling")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    return _svg(fig)


def render_html(report: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    rows = []
    for row in report["variants"]:
        cells = "".join(f"<td>{html.escape(cell(row, key, fmt))}</td>" for key, _, fmt in COLUMNS)
        css = " class='front'" if row.get("pareto_front") else ""
        rows.append(f"<tr{css}>{cells}</tr>")
    notes = render_markdown(report).split("\n\n", 2)[-1]
    paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in notes.strip().split("\n") if p)
    title = html.escape(f"edgellm report: {report['model']['source']}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
            f"<table id='variants'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}"
            f"</tbody></table><p>Bold: on the Pareto front of size and perplexity. Click a "
            f"header to sort.</p>{paragraphs}"
            f"<figure id='size-quality'>{size_quality_svg(report['variants'])}</figure>"
            f"<figure id='decode-ceiling'>{decode_ceiling_svg(report['variants'])}</figure>"
            f"<script>{SCRIPT}</script></body></html>\n")
