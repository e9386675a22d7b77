"""A report on disk: written as report.json, report.md and report.html at the end of a run
(`write_reports`), and read back by gate, compare and report: one line, exit 2, for
anything that is not a report a run wrote, before a figure of it is used.

A report is a JSON object whose `variants` are objects with distinct printable names. For
compare and report its figures must be numbers or null (NaN and infinities are shown as
they are); the gate reads figures itself and counts one it cannot trust (missing, not a
number, not finite) as a breach. `report` also needs the sections report.md describes the
run with.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgellm.errors import UserError

TEXT_FIELDS = ("format", "weights", "runtime")
NUMBER_FIELDS = ("size_bytes", "size_mb", "compression_ratio", "bits_per_weight", "ppl",
                 "ppl_delta_pct", "kl_mean", "kl_p99", "top1_agreement", "prefill_tps",
                 "decode_tps", "decode_pct_of_ceiling", "ttft_ms", "peak_rss_mb", "parameters",
                 "sparsity")
# what report.md and report.html describe the run with, by section
RENDERED = {"model": ("source",),
            "eval": ("text", "sha256", "tokens_scored", "windows", "ctx", "decode_tokens"),
            "machine": ("threads", "omp_wait_policy", "cpu", "physical_cores", "memory_gb", "os",
                        "python")}
REGENERATE = "regenerate it with `edgellm run`"


def load_report(path: Path, figures: bool = False, rendered: bool = False) -> dict:
    """The report at `path`, checked: with `figures`, each figure a number or null (compare
    and report print them; the gate instead counts a figure it cannot trust as a breach
    of the budget that reads it), with `rendered`, also the sections report.md needs."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"report {path} does not exist: run `edgellm run` first or fix the path")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        raise UserError(f"report {path} is not valid JSON: pass the report.json a run wrote") from None
    except OSError as exc:
        raise UserError(f"cannot read report {path} ({exc.strerror}): fix the path") from None
    if not isinstance(report, dict):
        raise UserError(f"report {path} is not a JSON object: pass the report.json a run wrote")
    variants = report.get("variants")
    if not isinstance(variants, list) or not variants:
        raise UserError(f"report {path} has no variants: pass the report.json a run wrote")
    _check_names(variants, path)
    for row in variants if figures else []:
        _check_fields(row, path)
    if rendered:
        _check_sections(report, path)
    return report


def _check_names(variants: list, path: Path) -> None:
    seen = set()
    for number, row in enumerate(variants, 1):
        name = row.get("name") if isinstance(row, dict) else None
        if not isinstance(name, str) or not name or not name.isprintable():
            raise UserError(f"report {path}: variant {number} is not an object with a name: "
                            f"{REGENERATE}")
        if name in seen:
            raise UserError(f"report {path}: two variants are named '{name}': {REGENERATE}")
        seen.add(name)


def _check_fields(row: dict, path: Path) -> None:
    for key in NUMBER_FIELDS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise UserError(f"report {path}: variant '{row['name']}' has {key} = "
                            f"{json.dumps(value)[:40]}, not a number: {REGENERATE}")
    for key in TEXT_FIELDS:
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise UserError(f"report {path}: variant '{row['name']}' has {key} = "
                            f"{json.dumps(value)[:40]}, not text: {REGENERATE}")
    steps = row.get("steps")
    if steps is not None and not (isinstance(steps, list) and all(isinstance(s, str) for s in steps)):
        raise UserError(f"report {path}: variant '{row['name']}' has steps that are not a list "
                        f"of names: {REGENERATE}")


def _check_sections(report: dict, path: Path) -> None:
    for section, keys in RENDERED.items():
        part = report.get(section)
        missing = [k for k in keys if not isinstance(part, dict) or part.get(k) is None]
        if missing:
            raise UserError(f"report {path} lacks {section}.{missing[0]}, which report.md shows "
                            f"(it holds only what the gate reads): {REGENERATE}")


def write_reports(report: dict, out: Path) -> list[Path]:
    from edgellm.artifacts import write_json_atomic, write_text_atomic
    from edgellm.report_html import render_html
    from edgellm.report_markdown import render_markdown

    paths = [out / "report.json", out / "report.md", out / "report.html"]
    write_json_atomic(paths[0], report)
    write_text_atomic(paths[1], render_markdown(report))
    write_text_atomic(paths[2], render_html(report))
    return paths
