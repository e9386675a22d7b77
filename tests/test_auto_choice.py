"""`edgellm export --max-size-mb/--max-ppl-increase-pct`: measure candidate types of the
format (GGUF, ONNX, MLX) and keep the one that meets the budgets best, with the evidence in
OUT/report.*."""

import json

import pytest
from conftest import run_cli

from edgellm.auto import pick

ROWS = [{"name": "gguf-q8_0", "weights": "q8_0", "size_bytes": 145e6, "ppl": 30.3, "ppl_delta_pct": 0.5},
        {"name": "gguf-q4_k_m", "weights": "q4_k_m", "size_bytes": 105e6, "ppl": 31.6,
         "ppl_delta_pct": 4.9},
        {"name": "gguf-q4_0", "weights": "q4_0", "size_bytes": 92e6, "ppl": 37.5, "ppl_delta_pct": 24.4}]


@pytest.mark.parametrize("size, ppl, chosen", [
    (150, None, "gguf-q8_0"),  # everything fits: the best quality
    (110, None, "gguf-q4_k_m"),
    (None, 10, "gguf-q4_k_m"),  # the smallest within +10%
    (100, 30, "gguf-q4_0"),
    (100, 10, None),  # nothing meets both
])
def test_pick_follows_the_rule_of_the_budgets_given(size, ppl, chosen):
    assert pick(ROWS, size, ppl)["chosen"] == chosen


def test_size_budgets_on_the_tiny_model_measure_what_fits_and_keep_its_best(tmp_path, tiny_llama):
    out = tmp_path / "out"
    args = ["export", tiny_llama, "--candidates", "f16,q8_0,q4_0", "--max-tokens", 512,
            "--ctx", 64, "--out", out]
    sizes = {}
    for budget in (1.0, None):
        if budget is None:  # a budget between q8_0 and f16, from the sizes just measured
            budget = (sizes["gguf-q8_0"] + sizes["gguf-f16"]) / 2 / 1e6
        result = run_cli(*args, "--max-size-mb", budget)
        assert result.returncode == 0, result.stderr
        report = json.loads((out / "report.json").read_text())
        sizes = {r["name"]: r["size_bytes"] for r in report["variants"]}
        choice = report["choice"]
        assert (out / f"chosen-{choice['chosen']}.gguf").is_file()
        assert len(list(out.glob("chosen-*.gguf"))) == 1
        assert f"Chosen: {choice['chosen']}" in (out / "report.md").read_text()
        measured = {r["name"]: r["ppl"] for r in report["variants"][1:]}
        # a random model's perplexities are near-uniform noise: the rule is checked, the
        # SmolLM2 end-to-end test checks that two budgets choose two types
        assert choice["chosen"] == min(measured, key=measured.get)
        assert f"chose {choice['weights']}" in result.stdout
        if budget == 1.0:
            assert set(measured) == {"gguf-f16", "gguf-q8_0", "gguf-q4_0"}
        else:
            assert set(measured) == {"gguf-q8_0", "gguf-q4_0"}
            assert report["not_measured"][0]["name"] == "gguf-f16"
            assert "built" not in result.stdout  # the second budget reused every build


def test_no_candidate_within_budget_exits_1_with_the_report(tmp_path, tiny_llama):
    out = tmp_path / "out"
    result = run_cli("export", tiny_llama, "--candidates", "q8_0,q4_0", "--max-tokens", 512,
                     "--ctx", 64, "--max-ppl-increase-pct", -50, "--out", out)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: no gguf type fits")
    assert "Chosen: none" in (out / "report.md").read_text()
    assert not list(out.glob("chosen-*"))


RUNTIME = {"gguf": "llama.cpp", "onnx": "onnxruntime"}


@pytest.mark.parametrize("to, small, large", [("gguf", "q4_0", "q8_0"), ("onnx", "int4", "int8")])
def test_a_type_per_matrix_planned_for_the_budget_is_a_candidate(tmp_path, tiny_llama, to, small,
                                                                 large):
    """`mixed` beside the single types, measured in the format's runtime: a GGUF is linked
    as the choice, a folder format's choice stays in its variant's folder."""
    out = tmp_path / "out"
    args = ["export", tiny_llama, "--to", to, "--candidates", f"{large},{small},mixed",
            "--max-tokens", 256, "--ctx", 64, "--out", out]
    assert run_cli(*args, "--max-size-mb", 100).returncode == 0
    sizes = {r["name"]: r["size_bytes"] for r in json.loads((out / "report.json").read_text())["variants"]}
    budget = (sizes[f"{to}-{small}"] + sizes[f"{to}-{large}"]) / 2 / 1e6  # the large type no longer fits
    result = run_cli(*args, "--max-size-mb", budget)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"][1:]}
    mixed = rows[f"{to}-mixed-{budget:g}mb"]
    assert set(rows) == {f"{to}-{small}", f"{to}-mixed-{budget:g}mb"}  # the large one not measured
    assert all(r["runtime"] == RUNTIME[to] for r in rows.values())
    assert mixed["weights"] == "mixed" and mixed["size_bytes"] <= budget * 1e6
    assert mixed["size_bytes"] > sizes[f"{to}-{small}"] and len(mixed["tensor_types"]) >= 2
    chosen = report["choice"]["chosen"]
    assert chosen == min(rows, key=lambda n: rows[n]["ppl"])
    linked = out / f"chosen-{chosen}.gguf"
    wrote = linked if to == "gguf" else out / rows[chosen]["path"]
    assert f"wrote {wrote}" in " ".join(result.stdout.split())
    assert list(out.glob("chosen-*")) == ([linked] if to == "gguf" else [])


def test_a_budget_in_bits_per_weight_is_that_size_on_the_models_parameters(tmp_path, tiny_llama):
    """--target-bpw: the mixed candidate plans for the bpw, the single types are measured
    only where they fit bpw × parameters / 8, and the choice says both."""
    from pathlib import Path

    from edgellm.resources import count_parameters

    out, bpw = tmp_path / "out", 7.5  # the tiny model: q4_0 6.0 bpw, q8_0 9.2 (its vocabulary)
    size_mb = bpw * count_parameters(sorted(Path(tiny_llama).glob("*.safetensors"))) / 8 / 1e6
    result = run_cli("export", tiny_llama, "--candidates", "q8_0,q4_0,mixed", "--target-bpw", bpw,
                     "--max-tokens", 256, "--ctx", 64, "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"][1:]}
    assert set(rows) == {"gguf-q4_0", "gguf-mixed-7.5bpw"}
    assert [r["name"] for r in report["not_measured"]] == ["gguf-q8_0"]  # over 7.5 bpw
    assert rows["gguf-mixed-7.5bpw"]["size_bytes"] <= size_mb * 1e6
    assert rows["gguf-mixed-7.5bpw"]["size_bytes"] > rows["gguf-q4_0"]["size_bytes"]
    choice = report["choice"]
    assert choice["target_bpw"] == bpw and choice["max_size_mb"] == pytest.approx(size_mb)
    assert f"size ≤ {size_mb:.1f} MB (7.5 bpw)" in choice["budget_text"]


@pytest.mark.parametrize("args, message", [
    (["--to", "ort", "--max-size-mb", 10], "in gguf, onnx, mlx: not --to ort"),
    (["--to", "torch", "--candidates", "f16", "--max-size-mb", 10], "not --to torch"),
    (["--weights", "q4_0", "--max-size-mb", 10], "leave --weights out"),
    (["--to", "onnx", "--candidates", "q4_0", "--max-size-mb", 10], "weights 'q4_0' not available"),
    (["--candidates", "q9_9", "--max-size-mb", 10], "weights 'q9_9' not available"),
    (["--candidates", "q4_0,mixed", "--max-ppl-increase-pct", 5], "give --max-size-mb"),
    (["--target-bpw", 1.5], "--target-bpw 1.5 is below the smallest candidate type"),
    (["--to", "mlx", "--target-bpw", 12], "--target-bpw 12 is above the largest candidate type"),
    (["--target-bpw", 5, "--max-size-mb", 10], "the same budget: give one of them"),
    (["--max-size-mb", 0], "--max-size-mb: Input should be greater than 0"),
])
def test_bad_auto_choice_options_are_one_line(tmp_path, tiny_llama, args, message):
    result = run_cli("export", tiny_llama, *args, "--out", tmp_path / "o")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
