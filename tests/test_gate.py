"""`edgellm gate`: 0 within budget, 1 over budget (each breach one line), 2 bad input."""

import json
from xml.etree import ElementTree

import pytest
from conftest import GATE_ROWS, run_cli


@pytest.fixture
def report(tmp_path):
    rows = GATE_ROWS
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


def test_kl_budget_breaks_the_variant_that_moved_too_far(report, tmp_path):
    result = run_cli("gate", report, "--max-kl", 0.05)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["q4: mean KL divergence 0.1200 nats > budget 0.05"]
    budgets = tmp_path / "budgets.toml"
    budgets.write_text("max_kl = 0.001\n[variant.q4]\nmax_kl = 0.5\n")
    from_file = run_cli("gate", report, "--budgets", budgets)
    assert from_file.stderr.strip().splitlines() == ["q8: mean KL divergence 0.0020 nats > budget 0.001"]
    old = tmp_path / "old.json"  # a report written before KL was measured
    old.write_text(json.dumps({"variants": [{"name": "q8", "size_bytes": 1, "ppl": 2.0,
                                             "ppl_delta_pct": 0.0, "decode_tps": 1.0}]}))
    missing = run_cli("gate", old, "--max-kl", 1)
    assert missing.returncode == 1 and "no KL measured" in missing.stderr


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


def test_budgets_file_sets_defaults_and_per_variant_limits(report, tmp_path):
    budgets = tmp_path / "budgets.toml"
    budgets.write_text("max_ppl_increase_pct = 5\n[variant.q4]\nmax_ppl_increase_pct = 25\n")
    result = run_cli("gate", report, "--budgets", budgets)
    assert result.returncode == 0, result.stderr  # q4's +20% is within its own +25%
    budgets.write_text("max_ppl_increase_pct = 5\n[variant.q4]\nmax_size_mb = 50\n")
    result = run_cli("gate", report, "--budgets", budgets, "--junit", tmp_path / "gate.xml")
    assert result.returncode == 1
    assert set(result.stderr.strip().splitlines()) == {
        "q4: size 92.0 MB > budget 50 MB", "q4: perplexity +20.00% > budget +5%"}
    suite = ElementTree.parse(tmp_path / "gate.xml").getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "2"


def test_command_line_limits_override_the_budgets_file(report, tmp_path):
    budgets = tmp_path / "budgets.toml"
    budgets.write_text("max_ppl_increase_pct = 5\n")
    result = run_cli("gate", report, "--budgets", budgets, "--max-ppl-increase-pct", 30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("content, message", [
    ("max_size_mb = \"big\"\n", "max_size_mb"),
    ("max_size = 3\n", "max_size"),
    ("max_size_mb = [\n", "not valid TOML"),
])
def test_bad_budgets_file_is_one_line_exit_2(report, tmp_path, content, message):
    budgets = tmp_path / "budgets.toml"
    budgets.write_text(content)
    result = run_cli("gate", report, "--budgets", budgets)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "budgets.toml" in lines[0], lines


def test_compare_shows_the_change_per_variant(report, tmp_path):
    new = json.loads(report.read_text())
    new["variants"][2].update(size_bytes=80_000_000, ppl_delta_pct=12.5, decode_tps=120.0)
    new["variants"].append({"name": "q5", "size_bytes": 105_000_000, "ppl": 20.5,
                            "ppl_delta_pct": 2.7, "decode_tps": 90.0})
    new_path = tmp_path / "new" / "report.json"
    new_path.parent.mkdir()
    new_path.write_text(json.dumps(new))
    result = run_cli("compare", report, new_path.parent, "--markdown", tmp_path / "change.md")
    assert result.returncode == 0, result.stderr
    assert "| q4 | 92.0 → 80.0 | -13.0% | +20.00 → +12.50 | 110.0 → 120.0 |" in result.stdout
    assert "| q5 (added) | 105.0 |" in result.stdout
    assert "| q4 | 92.0 → 80.0 |" in (tmp_path / "change.md").read_text()


def test_compare_with_a_missing_report_is_one_line_exit_2(report, tmp_path):
    result = run_cli("compare", report, tmp_path / "nope.json")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "nope.json" in result.stderr


DELETE = object()  # a key taken out of the row


def write_rows(path, changes: dict):
    """The fixture's report with `changes` ({(row index, key): value or DELETE}) applied."""
    report = json.loads(path.read_text())
    for (index, key), value in changes.items():
        row = report["variants"][index]
        if value is DELETE:
            del row[key]
        else:
            row[key] = value
    path.write_text(json.dumps(report))  # NaN and ±inf as JSON's NaN, Infinity, -Infinity
    return path


@pytest.mark.parametrize("key, value, option", [
    ("size_bytes", float("nan"), "--max-size-mb"),
    ("size_bytes", -1, "--max-size-mb"),
    ("size_bytes", DELETE, "--max-size-mb"),
    ("ppl", float("nan"), "--max-ppl-increase-pct"),
    ("ppl", 0, "--max-ppl-increase-pct"),
    ("ppl_delta_pct", float("nan"), "--max-ppl-increase-pct"),
    ("ppl_delta_pct", float("-inf"), "--max-ppl-increase-pct"),
    ("ppl_delta_pct", None, "--max-ppl-increase-pct"),
    ("ppl_delta_pct", "0.1", "--max-ppl-increase-pct"),
    ("decode_tps", float("inf"), "--min-decode-tps"),
    ("decode_tps", True, "--min-decode-tps"),
    ("kl_mean", float("nan"), "--max-kl"),
    ("kl_mean", [0.0], "--max-kl"),
    pytest.param("kl_mean", 10**400, "--max-kl", id="kl_mean-10**400-max-kl"),
])
def test_a_figure_that_cannot_be_trusted_is_a_breach(report, tmp_path, key, value, option):
    write_rows(report, {(1, key): value})  # q8, within every budget below when sound
    junit = tmp_path / "gate.xml"
    result = run_cli("gate", report, option, 1000 if option != "--min-decode-tps" else 1,
                     "--junit", junit)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"q8: {key} ") and option[2:] in lines[0], lines
    failures = ElementTree.parse(junit).getroot().findall(".//failure")
    assert [(f.get("message")) for f in failures] == lines


def test_nan_figures_do_not_pass(report):
    nan = float("nan")
    write_rows(report, {(2, "ppl"): nan, (2, "ppl_delta_pct"): nan, (2, "kl_mean"): nan})
    result = run_cli("gate", report, "--max-ppl-increase-pct", 25, "--max-kl", 1)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "q4: ppl is NaN, not a finite number > 0: fails max-ppl-increase-pct; rerun `edgellm run`",
        "q4: kl_mean is NaN, not a finite number >= 0: fails max-kl; rerun `edgellm run`"]


def test_unbudgeted_figures_are_not_gated(report):
    write_rows(report, {(1, "decode_tps"): None, (2, "kl_mean"): DELETE})
    result = run_cli("gate", report, "--max-size-mb", 200)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("option, value", [
    ("--max-ppl-increase-pct", "nan"), ("--max-ppl-increase-pct", "inf"),
    ("--max-ppl-increase-pct", "-1"), ("--max-size-mb", "nan"), ("--max-size-mb", "inf"),
    ("--min-decode-tps", "NaN"), ("--max-kl", "nan"), ("--max-kl", "-inf"),
])
def test_a_budget_that_is_not_a_finite_number_is_bad_input(report, option, value):
    result = run_cli("gate", report, f"{option}={value}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "Traceback" not in result.stderr, lines


@pytest.mark.parametrize("content, key", [
    ("max_ppl_increase_pct = nan\n", "max_ppl_increase_pct"),
    ("max_ppl_increase_pct = inf\n", "max_ppl_increase_pct"),
    ("max_ppl_increase_pct = -5\n", "max_ppl_increase_pct"),
    ("max_kl = -inf\n", "max_kl"),
    ("max_size_mb = true\n", "max_size_mb"),
    ("max_size_mb = 100\n[variant.q4]\nmin_decode_tps = nan\n", "variant.q4.min_decode_tps"),
])
def test_a_budgets_file_limit_that_is_not_a_finite_number_is_bad_input(report, tmp_path, content, key):
    budgets = tmp_path / "budgets.toml"
    budgets.write_text(content)
    result = run_cli("gate", report, "--budgets", budgets)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"'{key}'" in lines[0] and "finite number >= 0" in lines[0], lines


@pytest.mark.parametrize("content", [
    "[variant.q4x]\nmax_ppl_increase_pct = 1\n",  # the only limit, for a misspelt variant
    "max_size_mb = 200\n[variant.Q4]\nmax_kl = 0.01\n",
])
def test_a_budget_for_a_variant_not_in_the_report_is_bad_input(report, tmp_path, content):
    budgets = tmp_path / "budgets.toml"
    budgets.write_text(content)
    result = run_cli("gate", report, "--budgets", budgets)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "names no variant" in lines[0] and "fix the name" in lines[0], lines


def test_a_budget_only_for_an_ungated_variant_is_bad_input(report, tmp_path):
    budgets = tmp_path / "budgets.toml"
    budgets.write_text("[variant.reference]\nmax_size_mb = 1\n")
    result = run_cli("gate", report, "--budgets", budgets)
    assert result.returncode == 2 and "gate needs a budget for q8, q4" in result.stderr


@pytest.mark.parametrize("text, message", [
    ("[]", "not a JSON object"),
    ("3", "not a JSON object"),
    ("NaN", "not a JSON object"),
    ('{"variants": {"q8": {}}}', "has no variants"),
    ('{"variants": []}', "has no variants"),
    ('{"variants": [3]}', "variant 1 is not an object with a name"),
    ('{"variants": [{"size_bytes": 1}]}', "variant 1 is not an object with a name"),
    ('{"variants": [{"name": "q8"}, {"name": null}]}', "variant 2 is not an object with a name"),
    ('{"variants": [{"name": "a\\nb"}]}', "variant 1 is not an object with a name"),
    ('{"variants": [{"name": "q8"}, {"name": "q8"}]}', "two variants are named 'q8'"),
    ('{"variants": [{"name": "reference"}]}', "nothing to gate"),
    ('[' * 100_000, "not valid JSON"),
])
def test_a_malformed_report_is_bad_input(tmp_path, text, message):
    path = tmp_path / "report.json"
    path.write_text(text)
    result = run_cli("gate", path, "--max-size-mb", 1)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, lines
