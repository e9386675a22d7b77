"""`edgellm gate`: 0 within budget, 1 over budget (each breach one line), 2 bad input."""

import json
from xml.etree import ElementTree

import pytest
from conftest import run_cli


@pytest.fixture
def report(tmp_path):
    rows = [
        {"name": "reference", "size_bytes": 538_000_000, "ppl": 20.0, "ppl_delta_pct": 0.0,
         "decode_tps": 12.0},
        {"name": "q8", "size_bytes": 145_000_000, "ppl": 20.1, "ppl_delta_pct": 0.5,
         "decode_tps": 80.0},
        {"name": "q4", "size_bytes": 92_000_000, "ppl": 24.0, "ppl_delta_pct": 20.0,
         "decode_tps": 110.0},
    ]
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"variants": rows}))
    return path


def test_within_budget_exits_0(report):
    result = run_cli("gate", report, "--max-size-mb", 200, "--max-ppl-increase-pct", 25)
    assert result.returncode == 0, result.stderr
    assert "2 variant(s) within budget" in result.stdout


def test_over_size_exits_1_naming_the_variant(report):
    result = run_cli("gate", report, "--max-size-mb", 100)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["q8: size 145.0 MB > budget 100 MB"]


def test_each_breach_is_one_line(report):
    result = run_cli("gate", report, "--max-ppl-increase-pct", 0.1, "--min-decode-tps", 100)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ["q8: perplexity +0.50% > budget +0.1%", "q8: decode 80.0 tok/s < budget 100 tok/s",
                     "q4: perplexity +20.00% > budget +0.1%"]


def test_variant_filter_and_junit(report, tmp_path):
    junit = tmp_path / "gate.xml"
    result = run_cli("gate", report, "--max-size-mb", 100, "--variant", "q4", "--junit", junit)
    assert result.returncode == 0
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0"
    failing = run_cli("gate", report, "--max-size-mb", 100, "--junit", junit)
    assert failing.returncode == 1
    failures = ElementTree.parse(junit).getroot().findall(".//failure")
    assert [f.get("message") for f in failures] == ["q8: size 145.0 MB > budget 100 MB"]


@pytest.mark.parametrize("args, message", [
    (["missing.json", "--max-size-mb", "1"], "does not exist"),
    (["REPORT"], "needs a budget"),
    (["REPORT", "--max-size-mb", "1", "--variant", "nope"], "'nope' is not in"),
    (["REPORT", "--max-size-mb", "lots"], "Invalid value for '--max-size-mb'"),
])
def test_bad_input_exits_2_with_one_line(report, tmp_path, args, message):
    args = [str(report) if a == "REPORT" else (str(tmp_path / a) if a.endswith(".json") else a)
            for a in args]
    result = run_cli("gate", *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_garbage_report_exits_2(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("{not json")
    result = run_cli("gate", path, "--max-size-mb", 1)
    assert result.returncode == 2 and "not valid JSON" in result.stderr
