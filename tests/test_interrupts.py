"""Ctrl-C and kills in the middle of a run: a one-line message and exit 130 for SIGINT, no
staging folder or temporary file left behind, and a rerun that completes."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import shared_text

from edgellm.artifacts import trusted

RECIPE = """
[model]
source = "{model}"
[eval]
max_tokens = 1024
ctx = 64
decode_tokens = 8
threads = 1
[calibration]
text = "{valid}"
samples = 8
seqlen = 64
[[variant]]
name = "f16"
export = {{ format = "gguf", weights = "f16" }}
[[variant]]
name = "gptq"
compress = [{{ method = "gptq" }}]
export = {{ format = "gguf", weights = "q4_0" }}
[[variant]]
name = "onnx"
export = {{ format = "onnx", weights = "f32" }}
"""


def _default_sigint():
    # a test run started in the background (`make test &`) inherits SIGINT ignored, and so
    # would the child, as Unix wants for background jobs: give it back the terminal's default
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(recipe, out):
    return subprocess.Popen([sys.executable, "-m", "edgellm.cli", "run", str(recipe), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _wait_for(path_test, proc, limit=300.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if path_test():
            return True
        time.sleep(0.05)
    return False


def _leftovers(out):
    return [p for p in out.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]


def _recipe(tmp_path, tiny_llama):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(model=tiny_llama, valid=shared_text("wikitext-2-valid.txt")))
    return recipe


def test_sigint_mid_run_exits_130_cleanly_and_a_rerun_completes(tmp_path, tiny_llama):
    recipe, out = _recipe(tmp_path, tiny_llama), tmp_path / "out"
    proc = _start(recipe, out)
    # interrupt while the GPTQ step is being built (its staging folder exists)
    started = _wait_for(lambda: any((out / "_work" / "steps").glob(".*.partial"))
                        if (out / "_work" / "steps").is_dir() else False, proc)
    assert started, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["error: interrupted"]
    assert _leftovers(out) == []
    assert not (out / "report.json").exists()
    rerun = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", str(recipe), "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert "f16: up to date" in rerun.stdout  # built before the interrupt, trusted now


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_llama):
    """The recipe run once without interruption: what every killed-then-rerun run must equal."""
    folder = tmp_path_factory.mktemp("clean")
    recipe = _recipe(folder, tiny_llama)
    result = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", str(recipe), "--out",
                             str(folder / "out")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return folder / "out"


def _rows(folder):
    return {v["name"]: v for v in json.loads((folder / "report.json").read_text())["variants"]}


# where the run is killed: a path that exists only while that phase is under way
# (measure and report start from the clean run's builds with every measurement removed:
# killing them needs no rebuild, and the rerun must still equal the clean run)
KILL_POINTS = {
    "quantize": lambda out: any((out / "_work" / "steps").glob(".gptq-*.partial")),
    "export": lambda out: any(out.glob(".onnx.partial")),
    "measure": lambda out: (out / "_work" / "measure-gptq").is_dir(),
    "report": lambda out: (out / "report.json").is_file(),  # md and html still to come
}


AFTER_BUILDS = ("measure", "report")


def _builds_of(clean_run, out):
    """The clean run's folder without its measurements or report."""
    import shutil

    shutil.copytree(clean_run, out)
    for path in [*out.glob("*/measurement.json"), *out.glob("report.*"),
                 *out.glob("_work/reference-topk-*")]:
        path.unlink()
    for path in out.glob("_work/measure-*"):
        shutil.rmtree(path)


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_leaves_nothing_trusted_and_the_rerun_matches_a_clean_run(tmp_path, tiny_llama,
                                                                         clean_run, point):
    recipe, out = _recipe(tmp_path, tiny_llama), tmp_path / "out"
    if point in AFTER_BUILDS:
        _builds_of(clean_run, out)
    proc = _start(recipe, out)
    reached = _wait_for(lambda: KILL_POINTS[point](out), proc)
    proc.kill()  # SIGKILL: no handler runs, staging folders and temporary files stay behind
    proc.communicate()
    assert reached, f"the run ended before reaching {point}"
    for manifest in out.rglob("manifest.json"):  # whatever claims to be complete, is
        folder = manifest.parent
        record = json.loads(manifest.read_text())
        assert trusted(folder, record["key"]), folder
    rerun = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", str(recipe), "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert _leftovers(out) == []
    rows, expected = _rows(out), _rows(clean_run)
    assert rows.keys() == expected.keys()
    for name, row in expected.items():
        assert rows[name]["size_bytes"] == row["size_bytes"], name
        assert rows[name]["ppl"] == row["ppl"], name
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
