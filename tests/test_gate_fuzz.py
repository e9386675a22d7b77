"""Fuzz `edgellm gate` with hypothesis: start from a report and budgets that fail the gate,
then break gated figures (NaN, ±inf, null, strings, deleted keys, impossible values), budgets
(NaN, ±inf, negative, not numbers, tables for variants the report lacks) or the report's
structure. No mutation may make the gate exit 0: a broken figure is a breach (exit 1), a
broken budget or report is bad input (exit 2, one line). Each example runs the CLI in-process
(`edgellm.cli.main`, as the console script does), so a hundred take a few seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

from conftest import GATE_ROWS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm import cli

EXAMPLES = int(os.environ.get("EDGELLM_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, database=None,
                suppress_health_check=[HealthCheck.too_slow])
ROWS = GATE_ROWS
NAMES = [row["name"] for row in ROWS]
FIGURES = ("size_bytes", "ppl", "ppl_delta_pct", "decode_tps", "kl_mean")
LIMIT_KEYS = ("max_size_mb", "max_ppl_increase_pct", "min_decode_tps", "max_kl")
# starting points that fail: (command-line options, budgets file table or None)
FAILING = [
    ({"max-size-mb": 100}, None),  # q8 is 145 MB
    ({"max-ppl-increase-pct": 10}, None),  # q4 is +20%
    ({}, {"max_kl": 0.05}),  # q4's KL is 0.12
    ({}, {"max_ppl_increase_pct": 25, "variant": {"q4": {"max_size_mb": 50}}}),
    ({"min-decode-tps": 100}, {"variant": {"q4": {"max_kl": 0.5}}}),  # q8 decodes 80 tok/s
]
# values no sound figure holds (-100 is below every figure's least value)
BAD_FIGURES = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, None, True, False, 10**400, -100, -1e300]),
    st.text(max_size=6), st.lists(st.floats(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
BAD_LIMITS = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -1e-9, -100, True]),
                       st.text(max_size=6), st.lists(st.integers(), max_size=2))
BAD_OPTIONS = st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "-1", "-0.5", "lots", ""])
# names the report does not have: a misspelt [variant.NAME] table
TYPOS = st.text(min_size=1, max_size=8).filter(lambda name: name not in NAMES)
BAD_NAMES = st.sampled_from([None, 3, "", "a\nb", "q8", ["q4"]])  # "q8": a duplicate


def gate(args: list[str]) -> tuple[int, str]:
    """`edgellm gate ARGS`: its exit code and stderr."""
    err = io.StringIO()
    with (mock.patch.object(sys, "argv", ["edgellm", "gate", *map(str, args)]),
          contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO())):
        try:
            cli.main()
        except SystemExit as exc:
            return exc.code, err.getvalue()
    return 0, err.getvalue()


def toml_value(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # numbers; strings as TOML basic strings


def toml_text(table: dict) -> str:
    lines = [f"{key} = {toml_value(value)}" for key, value in table.items() if key != "variant"]
    for name, limits in table.get("variant", {}).items():
        lines.append(f"[variant.{json.dumps(name, ensure_ascii=False)}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in limits.items()]
    return "\n".join(lines) + "\n"


def run_case(rows, options: dict, budgets: dict | None, report_text: str | None = None):
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        report.write_text(report_text if report_text is not None else json.dumps({"variants": rows}))
        args = [report] + [f"--{flag}={value}" for flag, value in options.items()]
        if budgets is not None:
            (Path(folder) / "budgets.toml").write_text(toml_text(budgets))
            args += ["--budgets", Path(folder) / "budgets.toml"]
        return gate(args)


@st.composite
def broken_figures(draw) -> list[dict]:
    """ROWS with 1 to 4 gated figures replaced by values no sound report holds, or deleted."""
    rows = json.loads(json.dumps(ROWS))
    for _ in range(draw(st.integers(1, 4))):
        row, key = draw(st.sampled_from(rows)), draw(st.sampled_from(FIGURES))
        if draw(st.booleans()):
            row.pop(key, None)
        else:
            row[key] = draw(BAD_FIGURES)
    return rows


@st.composite
def broken_budgets(draw, options: dict, budgets: dict | None) -> tuple[dict, dict | None]:
    """The starting budgets with one limit made unsound or one [variant.NAME] misspelt."""
    options, budgets = dict(options), json.loads(json.dumps(budgets))
    kind = draw(st.sampled_from(["option", "limit", "variant limit", "typo"]))
    if kind == "option":
        options[draw(st.sampled_from([k.replace("_", "-") for k in LIMIT_KEYS]))] = draw(BAD_OPTIONS)
        return options, budgets
    budgets = budgets or {}
    if kind == "limit":
        budgets[draw(st.sampled_from(LIMIT_KEYS))] = draw(BAD_LIMITS)
    elif kind == "variant limit":
        table = budgets.setdefault("variant", {}).setdefault(draw(st.sampled_from(NAMES)), {})
        table[draw(st.sampled_from(LIMIT_KEYS))] = draw(BAD_LIMITS)
    else:  # misspell a table's name, or move a limit into a table for a variant not in the report
        tables = budgets.setdefault("variant", {})
        old = draw(st.sampled_from(sorted(tables))) if tables else None
        tables[draw(TYPOS)] = tables.pop(old) if old else {"max_kl": 0.0}
    return options, budgets


@st.composite
def broken_reports(draw) -> str:
    """Report text that is not JSON, not an object, or whose variants list is malformed."""
    report = {"variants": json.loads(json.dumps(ROWS))}
    kind = draw(st.sampled_from(["truncated", "not an object", "variants", "row", "name"]))
    if kind == "truncated":
        text = json.dumps(report)
        return text[:draw(st.integers(0, len(text) - 1))]
    if kind == "not an object":
        return json.dumps(draw(st.one_of(st.none(), st.integers(), st.text(), st.just(ROWS))))
    if kind == "variants":
        report["variants"] = draw(st.one_of(st.none(), st.just([]), st.just({"q8": ROWS[1]}),
                                            st.text(), st.integers()))
    elif kind == "row":
        report["variants"][draw(st.integers(0, 2))] = draw(st.one_of(st.none(), st.integers(),
                                                                     st.text(), st.just([])))
    else:
        report["variants"][draw(st.sampled_from([0, 2]))]["name"] = draw(BAD_NAMES)
    return json.dumps(report)


def test_the_starting_points_fail_and_a_sound_budget_passes():
    for options, budgets in FAILING:
        assert run_case(ROWS, options, budgets)[0] == 1, (options, budgets)
    assert run_case(ROWS, {"max-size-mb": 200, "max-ppl-increase-pct": 25}, None) == (0, "")


@FUZZ
@given(st.sampled_from(FAILING), broken_figures())
def test_broken_figures_never_pass(start, rows):
    code, stderr = run_case(rows, *start)
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert lines and all(line.split(": ", 1)[0] in NAMES for line in lines), lines


@FUZZ
@given(st.data(), st.sampled_from(FAILING), st.one_of(st.just(ROWS), broken_figures()))
def test_broken_budgets_are_bad_input(data, start, rows):
    options, budgets = data.draw(broken_budgets(*start))
    code, stderr = run_case(rows, options, budgets)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr


@FUZZ
@given(st.sampled_from(FAILING), broken_reports())
def test_broken_reports_are_bad_input(start, text):
    code, stderr = run_case(ROWS, *start, report_text=text)
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr
