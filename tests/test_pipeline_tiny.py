"""The pipeline end to end on a tiny model: variants built once, report written, reruns reuse."""

import json

import pytest
from conftest import run_cli, shared_text


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    recipe = out.parent / "recipe.toml"
    recipe.write_text(f"""
[model]
source = "{tiny_llama}"
[eval]
max_tokens = 512
ctx = 64
decode_tokens = 8
threads = 1
[[variant]]
name = "f16"
export = {{ format = "gguf", weights = "f16" }}
[[variant]]
name = "q8"
export = {{ format = "gguf", weights = "q8_0" }}
""")
    first = run_cli("run", recipe, "--out", out)
    assert first.returncode == 0, first.stderr
    return recipe, out, first


def test_report_has_every_variant_and_the_contract_keys(tiny_run):
    _, out, _ = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["reference", "f16", "q8"]
    keys = {"name", "format", "weights", "runtime", "path", "size_bytes", "bits_per_weight", "ppl",
            "ppl_delta_pct", "prefill_tps", "decode_tps", "ttft_ms", "peak_rss_mb", "steps"}
    for row in report["variants"]:
        assert keys <= row.keys()
        assert (out / row["path"]).exists()
    reference, f16, q8 = report["variants"]
    assert reference["ppl_delta_pct"] == 0 and reference["runtime"] == "torch"
    assert f16["runtime"] == "llama.cpp" and abs(f16["ppl_delta_pct"]) < 0.5
    assert q8["size_bytes"] < f16["size_bytes"] < reference["size_bytes"]
    assert report["eval"]["tokens"] == 512 and report["eval"]["ctx"] == 64
    assert report["machine"]["threads"] == 1
    assert "<svg" in (out / "report.html").read_text()
    assert "| f16 | gguf | f16 | llama.cpp |" in (out / "report.md").read_text()


def test_kl_divergence_from_the_reference_in_every_runtime(tiny_run):
    _, out, _ = tiny_run
    reference, f16, q8 = json.loads((out / "report.json").read_text())["variants"]
    assert reference["kl_mean"] == 0.0 and reference["top1_agreement"] == 1.0
    assert 0 <= f16["kl_mean"] < q8["kl_mean"] < 0.05  # f16 rounds less than q8_0
    assert q8["kl_p99"] >= q8["kl_mean"] and f16["top1_agreement"] > 0.95
    assert len(list((out / "_work").glob("reference-topk-*.npz"))) == 1
    assert "| KL | KL p99 | top-1 |" in (out / "report.md").read_text()


def test_rerun_rebuilds_nothing(tiny_run):
    recipe, out, first = tiny_run
    before = {p.parent.name: p.read_text() for p in out.glob("*/manifest.json")}
    second = run_cli("run", recipe, "--out", out)
    assert second.returncode == 0, second.stderr
    after = {p.parent.name: p.read_text() for p in out.glob("*/manifest.json")}
    assert before == after and set(after) == {"reference", "f16", "q8"}
    assert "built" not in second.stdout and second.stdout.count("up to date") == 3


def test_killed_build_is_not_trusted_and_rerun_completes(tiny_run):
    recipe, out, _ = tiny_run
    (out / "q8" / "model.gguf").write_bytes(b"GGUF truncated")  # as a crash would leave it
    rerun = run_cli("run", recipe, "--out", out)
    assert rerun.returncode == 0, rerun.stderr
    assert "q8: built" in rerun.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["variants"][2]["size_bytes"] > 1000


def test_report_command_regenerates_md_and_html(tiny_run):
    _, out, _ = tiny_run
    (out / "report.md").unlink()
    result = run_cli("report", out)
    assert result.returncode == 0, result.stderr
    assert (out / "report.md").read_text().startswith("# edgellm report")


def test_a_changed_tool_version_rebuilds_exactly_what_it_touches(tiny_llama, tmp_path, monkeypatch):
    """Build and measurement keys hold the versions of the tools that write and run each
    artifact: a new llama-cpp-python rebuilds and remeasures the GGUF, not the ONNX model
    or the reference."""
    from rich.console import Console

    from edgellm import tools
    from edgellm.pipeline import run_recipe
    from edgellm.recipe import load_recipe

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_llama}"\n[eval]\nmax_tokens = 256\nctx = 64\n'
                      'decode_tokens = 4\nthreads = 1\n[[variant]]\nname = "f16"\n'
                      'export = { format = "gguf", weights = "f16" }\n[[variant]]\nname = "onnx"\n'
                      'export = { format = "onnx", weights = "f32" }\n')
    spec, out = load_recipe(recipe), tmp_path / "out"
    run_recipe(spec, out, Console(record=True, width=200))
    from edgellm.export.llama_converter import ENV, converter_dir

    monkeypatch.setenv(ENV, str(converter_dir()))  # the installed one, whatever version is reported
    installed = tools.metadata.version
    monkeypatch.setattr(tools.metadata, "version", lambda package: "99.0" if package ==
                        "llama-cpp-python" else installed(package))
    console = Console(record=True, width=200)
    run_recipe(spec, out, console)
    text = console.export_text()
    assert "f16: built" in text and "f16: measuring" in text
    assert "onnx: up to date" in text and "onnx: measurement reused" in text
    assert "reference: up to date" in text and "reference: measurement reused" in text
    manifest = json.loads((out / "f16" / "manifest.json").read_text())
    assert manifest["tools"]["llama-cpp-python"] == "99.0"


def test_a_changed_step_identity_rebuilds_the_variant(tiny_llama, tmp_path, monkeypatch):
    """A variant's key holds its steps' keys: what a method says decides its output (its
    `identity`, e.g. GPTQ's grid or a budget's head solve) rebuilds the variant when it
    changes, even where the recipe's text did not."""
    import shutil

    from rich.console import Console

    from edgellm import compress
    from edgellm.pipeline import build_variant
    from edgellm.recipe import CalibrationSpec, VariantSpec

    out = tmp_path / "out"
    shutil.copytree(tiny_llama, out / "reference")
    variant = VariantSpec(name="pruned", compress=[{"method": "magnitude", "sparsity": 0.5}],
                          export={"format": "torch", "weights": "f32"})

    def build() -> str:
        console = Console(record=True, width=200)
        build_variant(variant, out, "reference-key", console, CalibrationSpec())
        return console.export_text()

    assert "pruned: built" in build()
    assert "pruned: up to date" in build()
    identity = compress.step_identity
    monkeypatch.setattr(compress, "step_identity",
                        lambda step, context: {**identity(step, context), "new": 1})
    again = build()
    assert "magnitude: wrote" in again and "pruned: built" in again


def test_an_export_that_reads_calibration_text_is_keyed_by_it(tiny_llama, tmp_path):
    """The torch int8 export measures each linear's inputs on the calibration text: another
    text rebuilds it, while an f32 folder, which reads none, stays up to date."""
    import shutil

    from rich.console import Console

    from edgellm.pipeline import build_variant
    from edgellm.recipe import CalibrationSpec, VariantSpec

    out = tmp_path / "out"
    shutil.copytree(tiny_llama, out / "reference")
    variants = [VariantSpec(name=f"torch-{weights}", export={"format": "torch", "weights": weights})
                for weights in ("int8", "f32")]

    def build(text: str) -> str:
        console = Console(record=True, width=200)
        calibration = CalibrationSpec(text=str(shared_text(text)), samples=2, seqlen=32)
        for variant in variants:
            build_variant(variant, out, "reference-key", console, calibration)
        return console.export_text()

    first = build("wikitext-2-valid.txt")
    assert "torch-int8: built" in first and "torch-f32: built" in first
    again = build("wikitext-2-raw-test.txt")
    assert "torch-int8: built" in again and "torch-f32: up to date" in again
