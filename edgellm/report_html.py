"""report.html: one self-contained page (inline SVG plot, no network) with the variants
table and a size-vs-perplexity plot."""

from __future__ import annotations

import html
import io

from edgellm.report import COLUMNS, cell, render_markdown

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"""


def size_quality_svg(variants: list[dict]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in variants:
        ax.scatter(row["size_mb"], row["ppl"], s=40)
        ax.annotate(row["name"], (row["size_mb"], row["ppl"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=9)
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("size vs quality")
    ax.grid(alpha=0.3)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buffer.getvalue()
    return svg[svg.index("<svg"):]


def render_html(report: dict) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in COLUMNS)
    rows = []
    for row in report["variants"]:
        cells = "".join(
            f"<td>{html.escape(cell(row, key, fmt))}</td>"
            for key, _, fmt in COLUMNS)
        rows.append(f"<tr>{cells}</tr>")
    notes = render_markdown(report).split("\n\n", 2)[-1]
    paragraphs = "".join(f"<p>{html.escape(p)}</p>" for p in notes.strip().split("\n") if p)
    title = html.escape(f"edgellm report: {report['model']['source']}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body><h1>{title}</h1>"
            f"<table id='variants'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}"
            f"</tbody></table>{paragraphs}<figure id='size-quality'>"
            f"{size_quality_svg(report['variants'])}</figure></body></html>\n")
