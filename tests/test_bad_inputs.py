"""Bad input on every command: exit 2, one line on stderr naming the input and the fix,
no traceback, nothing written to the output folder."""

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
    return {
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


CASES = ["missing model", "not a gguf", "gguf claiming huge counts", "truncated gguf header",
         "unknown gguf version", "unknown builtin", "folder without config",
         "pickle weights", "missing text", "empty text", "non-utf8 text", "text too short"]


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


def test_run_refuses_missing_recipe_and_file_as_out(tmp_path, tiny_llama):
    assert_clean_failure(run_cli("run", tmp_path / "none.toml"), "does not exist")
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
