"""Ctrl-C and kills in the middle of a run: a one-line message and exit 130 for SIGINT, no
staging folder or temporary file left behind, and a rerun that completes."""

import json
import signal
import subprocess
import sys
import time

from conftest import shared_text

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
    return [p for p in out.rglob("*") if ".partial" in p.name or p.name.endswith(".tmp")]


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


def test_sigkill_mid_run_leaves_nothing_trusted_and_the_rerun_matches_a_clean_run(tmp_path, tiny_llama):
    recipe = _recipe(tmp_path, tiny_llama)
    clean = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", str(recipe), "--out",
                            str(tmp_path / "clean")], capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "out"
    proc = _start(recipe, out)
    killed = _wait_for(lambda: any(out.glob(".onnx.partial")), proc)  # mid ONNX export
    assert killed, proc.communicate()[1]
    proc.kill()  # SIGKILL: no handler runs, staging folders stay behind
    proc.communicate()
    assert not (out / "onnx" / "manifest.json").exists()
    rerun = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", str(recipe), "--out", str(out)],
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    def rows_of(folder):
        return {v["name"]: v for v in json.loads((folder / "report.json").read_text())["variants"]}

    rows, expected = rows_of(out), rows_of(tmp_path / "clean")
    for name, row in expected.items():
        assert rows[name]["size_bytes"] == row["size_bytes"], name
        assert rows[name]["ppl"] == row["ppl"], name
