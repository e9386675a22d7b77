"""Bad input on every command: exit 2, one line on stderr naming the input and the fix,
no traceback, nothing written to the output folder."""

import json
import resource
import signal
import subprocess
import sys

import pytest
from conftest import run_cli

GOOD_VARIANT = '[[variant]]\nname = "f16"\nexport = { format = "gguf", weights = "f16" }\n'


def recipe_with(tmp_path, model, text="wikitext-2-raw-test", extra=""):
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*.toml')))}.toml"
    path.write_text(f'[model]\nsource = "{model}"\n[eval]\ntext = "{text}"\nctx = 64\n'
                    f'max_tokens = 256\n{extra}{GOOD_VARIANT}')
    return path


def make_inputs(tmp_path, tiny_llama):
    """Named bad inputs, created on demand inside tmp_path."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    (tmp_path / "short.txt").write_text("a few words only " * 5)
    (tmp_path / "notes.gguf").write_text("not a gguf file")
    import struct

    (tmp_path / "huge.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 2**60) + b"\0" * 64)
    (tmp_path / "cut.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3))
    (tmp_path / "v9.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 1, 1) + b"\0" * 64)
    (tmp_path / "textfile.txt").write_text("hello")
    (tmp_path / "folder").mkdir(exist_ok=True)
    pickle_dir = tmp_path / "pickle-model"
    pickle_dir.mkdir(exist_ok=True)
    (pickle_dir / "config.json").write_text("{}")
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (tmp_path / "empty.gguf").write_bytes(b"")
    truncated = copy_model(tiny_llama, tmp_path / "truncated-model")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage_header = copy_model(tiny_llama, tmp_path / "garbage-header-model")
    (garbage_header / "model.safetensors").write_bytes(b"\xff" * 64)
    wrong_arch = copy_model(tiny_llama, tmp_path / "wrong-arch-model")
    config = json.loads((wrong_arch / "config.json").read_text())
    # a supported family whose tensors the llama weights do not have (q_norm, k_norm);
    # an unsupported one is refused earlier, by tests/test_families.py's case
    config.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
    (wrong_arch / "config.json").write_text(json.dumps(config))
    return {
        "empty gguf": (recipe_with(tmp_path, tmp_path / "empty.gguf"), "not a GGUF file"),
        "truncated safetensors": (recipe_with(tmp_path, truncated), "truncated or corrupt"),
        "garbage safetensors": (recipe_with(tmp_path, garbage_header), "truncated or corrupt"),
        "weights of another architecture": (recipe_with(tmp_path, wrong_arch),
                                            "do not belong together"),
        "text is a folder": (recipe_with(tmp_path, tiny_llama, tmp_path / "folder"), "is a folder"),
        "missing model": (recipe_with(tmp_path, tmp_path / "nope"), "not found"),
        "not a gguf": (recipe_with(tmp_path, tmp_path / "notes.gguf"), "not a GGUF file"),
        "gguf claiming huge counts": (recipe_with(tmp_path, tmp_path / "huge.gguf"),
                                      "more than its 88 bytes can hold"),
        "truncated gguf header": (recipe_with(tmp_path, tmp_path / "cut.gguf"), "truncated"),
        "unknown gguf version": (recipe_with(tmp_path, tmp_path / "v9.gguf"), "GGUF version 9"),
        "unknown builtin": (recipe_with(tmp_path, "smollm9-1b"), "built-in name"),
        "folder without config": (recipe_with(tmp_path, tmp_path / "folder"), "no config.json"),
        "pickle weights": (recipe_with(tmp_path, pickle_dir), "pickle"),
        "missing text": (recipe_with(tmp_path, tiny_llama, tmp_path / "no.txt"), "does not exist"),
        "empty text": (recipe_with(tmp_path, tiny_llama, tmp_path / "empty.txt"), "is empty"),
        "non-utf8 text": (recipe_with(tmp_path, tiny_llama, tmp_path / "latin1.txt"), "not UTF-8"),
        "text too short": (recipe_with(tmp_path, tiny_llama, tmp_path / "short.txt"),
                           "fewer than one window"),
    }


def copy_model(source, dest):
    import shutil

    if not dest.exists():
        shutil.copytree(source, dest)
    return dest


CASES = ["empty gguf", "truncated safetensors", "garbage safetensors",
         "weights of another architecture", "text is a folder", "missing model", "not a gguf",
         "gguf claiming huge counts", "truncated gguf header", "unknown gguf version",
         "unknown builtin", "folder without config", "pickle weights", "missing text",
         "empty text", "non-utf8 text", "text too short"]


def assert_clean_failure(result, message, out=None):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    if out is not None:
        assert not out.exists()


@pytest.mark.parametrize("case", CASES)
def test_run_refuses_bad_recipe_inputs(tmp_path, tiny_llama, case):
    recipe, message = make_inputs(tmp_path, tiny_llama)[case]
    out = tmp_path / "out"
    assert_clean_failure(run_cli("run", recipe, "--out", out), message, out)


@pytest.mark.parametrize("content, message", [
    ("[model\n", "not valid TOML"),
    ("[eval]\nctx = 512\nwindow = 3\n", ":3: key 'eval.window'"),
    ('[[variant]]\nname = "x"\ncompress = [{method = "nope"}]\n'
     'export = { format = "gguf", weights = "f16" }\n', "unknown compress method"),
])
def test_run_refuses_invalid_recipes(tmp_path, content, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(content)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("run", recipe, "--out", out), message, out)


@pytest.mark.parametrize("table, message", [
    ("[eval]\nctx = 0\n", "key 'eval.ctx'"),
    ("[eval]\nmax_tokens = -5\n", "key 'eval.max_tokens'"),
    ("[eval]\nthreads = 0\n", "key 'eval.threads'"),
    ("[calibration]\nsamples = 0\n", "key 'calibration.samples'"),
    ('[[variant]]\nname = "x"\ncompress = [{method = "gptq", bits = 3}]\n'
     'export = { format = "gguf", weights = "q4_0" }\n', "gptq option 'bits'"),
    ('[[variant]]\nname = "x"\ncompress = [{method = "wanda", sparsity = 1.5}]\n'
     'export = { format = "gguf", weights = "f16" }\n', "wanda option 'sparsity'"),
    ('[[variant]]\nname = "x"\nexport = { format = "onnx", weights = "int4", block_size = 48 }\n',
     "key 'variant.0.export.block_size'"),
])
def test_run_refuses_bad_numbers(tmp_path, table, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(table)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("run", recipe, "--out", out), message, out)


def test_run_refuses_missing_recipe_and_file_as_out(tmp_path, tiny_llama):
    assert_clean_failure(run_cli("run", tmp_path / "none.toml"), "does not exist")
    assert_clean_failure(run_cli("run", tmp_path), "is a folder")
    out_file = tmp_path / "out.txt"
    out_file.write_text("x")
    recipe = recipe_with(tmp_path, tiny_llama)
    assert_clean_failure(run_cli("run", recipe, "--out", out_file), "is a file")


@pytest.mark.parametrize("artifact, message", [
    ("nope.gguf", "does not exist"), ("notes.gguf", "not a GGUF file"),
    ("textfile.txt", "not a GGUF file"), ("folder", "no config.json"),
    ("smollm9-1b", "built-in name"),
])
def test_eval_refuses_bad_artifacts(tmp_path, tiny_llama, artifact, message):
    make_inputs(tmp_path, tiny_llama)
    target = artifact if artifact == "smollm9-1b" else tmp_path / artifact
    assert_clean_failure(run_cli("eval", target, "--ctx", 64), message)


def test_eval_refuses_corrupt_models(tmp_path, tiny_llama):
    cases = make_inputs(tmp_path, tiny_llama)
    onnx_dir = tmp_path / "garbage-onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"\x08\x07garbage, not a protobuf of a graph" * 20)
    (onnx_dir / "tokenizer.json").write_bytes((tiny_llama / "tokenizer.json").read_bytes())
    assert_clean_failure(run_cli("eval", onnx_dir / "model.onnx", "--ctx", 64),
                         "not a valid ONNX/ORT model")
    for case in ("truncated safetensors", "weights of another architecture"):
        _, message = cases[case]
        assert_clean_failure(run_cli("eval", tmp_path / {
            "truncated safetensors": "truncated-model",
            "weights of another architecture": "wrong-arch-model"}[case], "--ctx", 64), message)


def test_eval_refuses_short_text(tmp_path, tiny_llama):
    make_inputs(tmp_path, tiny_llama)
    result = run_cli("eval", tiny_llama, "--text", tmp_path / "short.txt", "--ctx", 64)
    assert_clean_failure(result, "fewer than one window")


def test_export_refuses_bad_weights_and_models(tmp_path, tiny_llama):
    out = tmp_path / "exp"
    assert_clean_failure(run_cli("export", tiny_llama, "--weights", "q9", "--out", out),
                         "weights 'q9' not available", out)
    assert_clean_failure(run_cli("export", tmp_path / "nope", "--out", out), "not found", out)
    assert_clean_failure(run_cli("export", tiny_llama, "--to", "tflite", "--out", out),
                         "not supported", out)


def test_a_second_run_on_a_busy_output_folder_is_refused(tmp_path, tiny_llama):
    import fcntl
    import os

    out = tmp_path / "out"
    (out / "_work").mkdir(parents=True)
    with open(out / ".edgellm.lock", "a+") as held:  # as a running edgellm holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(str(os.getpid()))
        held.flush()
        result = run_cli("run", recipe_with(tmp_path, tiny_llama), "--out", out)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0] and str(os.getpid()) in lines[0], lines
    assert sorted(p.name for p in out.iterdir()) == [".edgellm.lock", "_work"]
    again = run_cli("run", recipe_with(tmp_path, tiny_llama), "--out", out)  # lock released
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("command", ["run", "export", "compress"])
def test_an_unwritable_or_file_output_folder_is_refused(tmp_path, tiny_llama, command):
    args = {"run": ["run", recipe_with(tmp_path, tiny_llama)],
            "export": ["export", tiny_llama],
            "compress": ["compress", tiny_llama, "--method", "magnitude"]}[command]
    # /proc refuses new folders even to root (chmod would not stop root)
    assert_clean_failure(run_cli(*args, "--out", "/proc/edgellm-test-out"),
                         "cannot create output folder /proc/edgellm-test-out")
    out_file = tmp_path / "out.txt"
    out_file.write_text("x")
    assert_clean_failure(run_cli(*args, "--out", out_file), "is a file")
    assert out_file.read_text() == "x"


def test_pickle_weights_need_allow_pickle_and_then_load_with_a_warning(tmp_path, tiny_llama):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_llama / name).read_bytes())
    torch.save(load_file(tiny_llama / "model.safetensors"), folder / "pytorch_model.bin")
    out = tmp_path / "exp"
    assert_clean_failure(run_cli("export", folder, "--out", out), "--allow-pickle", out)
    assert_clean_failure(run_cli("eval", folder, "--ctx", 64), "pickle")
    allowed = run_cli("export", folder, "--out", out, "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stderr.startswith("warning: reading pickle weights") and "weights_only=True" \
        in allowed.stderr
    exported = out / "pickled-f16.gguf"
    direct = run_cli("export", tiny_llama, "--out", tmp_path / "direct")
    assert direct.returncode == 0, direct.stderr
    # the same tensors as the safetensors folder gives (metadata differ: the folder's name)
    import gguf
    import numpy as np

    def tensors(path):
        return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}

    got, want = tensors(exported), tensors(tmp_path / "direct" / "tiny-llama-f16.gguf")
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def _no_room(limit_bytes):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@pytest.mark.parametrize("args", [["export"], ["export", "--to", "onnx"], ["run"]])
def test_a_full_disk_is_one_line_and_leaves_no_artifact(tmp_path, tiny_llama, args):
    """The disk filling up is simulated with a file-size limit on the process: every write
    past 100 kB fails, as on a full disk."""
    out = tmp_path / "out"
    target = [recipe_with(tmp_path, tiny_llama)] if args == ["run"] else [tiny_llama]
    result = subprocess.run([sys.executable, "-m", "edgellm.cli", args[0], *map(str, target),
                             *args[1:], "--out", str(out)], capture_output=True, text=True,
                            preexec_fn=_no_room(100_000), timeout=600)
    assert_clean_failure(result, f"cannot write to {out}")
    assert "free space" in result.stderr
    left = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert all(p.parts[0] in ("_work", ".edgellm.lock") for p in left), left
    assert not [p for p in out.rglob("*") if ".partial" in p.name or ".tmp-" in p.name]
    assert not list(out.rglob("manifest.json")) and not list(out.glob("*.gguf"))
    again = run_cli(*[args[0], *map(str, target), *args[1:], "--out", out])  # room again
    assert again.returncode == 0, again.stderr
