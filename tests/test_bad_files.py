"""Malformed files and paths, refused in one line with exit 2 before any work, by every
command that reads them: model folders read only through regular files that parse
(config, tokenizer, safetensors dtype × shape against byte ranges; no FIFO, no symlink that
loops, dangles or leaves the folder), names the file system cannot hold, variant names
that collide with edgellm's own files, and reports `compare` and `report` cannot read."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from conftest import run_cli
from test_bad_inputs import assert_clean_failure


def _copy(tiny_llama, dest):
    shutil.copytree(tiny_llama, dest)
    return dest


def _retyped_safetensors(folder):
    """The first F32 tensor's header says F16: its byte range is twice what F16 needs."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + length].replace(b'"dtype":"F32"', b'"dtype":"F16"', 1)
    assert header != data[8:8 + length]
    path.write_bytes(data[:8] + header + data[8 + length:])


def _reshaped_safetensors(folder):
    """The first tensor's header claims one more row than its bytes hold."""
    path = folder / "model.safetensors"
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"][0] += 1
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:])


FOLDER_CASES = {
    "config not JSON": (lambda f: (f / "config.json").write_text("{not json"),
                        "config.json is not valid JSON"),
    "config a list": (lambda f: (f / "config.json").write_text("[1, 2]"),
                      "config.json is not a JSON object"),
    "truncated tokenizer.json": (
        lambda f: (f / "tokenizer.json").write_bytes((f / "tokenizer.json").read_bytes()[:500]),
        "tokenizer.json is not valid JSON"),
    "tokenizer_config a string": (lambda f: (f / "tokenizer_config.json").write_text('"x"'),
                                  "tokenizer_config.json is not a JSON object"),
    "dtype against byte range": (_retyped_safetensors, "but its data spans"),
    "shape against byte range": (_reshaped_safetensors, "but its data spans"),
    "FIFO named safetensors": (lambda f: os.mkfifo(f / "extra.safetensors"), "is a FIFO"),
    "symlink loop": (lambda f: (f / "loop.safetensors").symlink_to("loop.safetensors"),
                     "symlink that loops"),
    "dangling symlink": (lambda f: (f / "extra.safetensors").symlink_to(f / "gone"),
                         "which does not exist"),
    "symlink out of the folder": (
        lambda f: ((f.parent / "elsewhere.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()), (f / "model.safetensors").unlink(),
            (f / "model.safetensors").symlink_to(f.parent / "elsewhere.safetensors")),
        "outside the folder"),
}


@pytest.mark.parametrize("command", ["export", "compress", "run"])
@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_a_malformed_model_folder_is_refused_before_any_work(tmp_path, tiny_llama, case, command):
    spoil, message = FOLDER_CASES[case]
    model = _copy(tiny_llama, tmp_path / "model")
    spoil(model)
    out = tmp_path / "out"
    if command == "run":
        recipe = tmp_path / "recipe.toml"
        recipe.write_text(f'[model]\nsource = "{model}"\n[eval]\nctx = 64\nmax_tokens = 256\n'
                          '[[variant]]\nname = "f16"\nexport = { format = "gguf", weights = "f16" }\n')
        args = ["run", recipe]
    elif command == "export":
        args = ["export", model, "--to", "gguf"]
    else:
        args = ["compress", model, "--method", "magnitude"]
    result = run_cli(*args, "--out", out, timeout=120)
    assert_clean_failure(result, message, out)


LONG = "x" * 300


@pytest.mark.parametrize("args", [
    ["export", "{model}", "--out", "{tmp}/" + LONG],
    ["export", "{tmp}/" + LONG, "--out", "{tmp}/out"],
    ["eval", "{tmp}/" + LONG + ".gguf"],
    ["gate", "{tmp}/" + LONG + ".json", "--max-size-mb", "1"],
], ids=["out", "model", "eval artifact", "gate report"])
def test_a_name_longer_than_the_file_system_allows_is_one_line(tmp_path, tiny_llama, args):
    filled = [a.format(model=tiny_llama, tmp=tmp_path) for a in args]
    result = run_cli(*filled, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, message", [
    ("report.json", "is reserved"), ("Report.HTML", "is reserved"),
    ("manifest.json", "is reserved"), ("v" * 101, "at most 100 characters"),
])
def test_a_variant_name_edgellm_cannot_use_is_refused(tmp_path, tiny_llama, name, message):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_llama}"\n[eval]\nctx = 64\nmax_tokens = 256\n'
                      f'[[variant]]\nname = "{name}"\nexport = {{ format = "gguf", weights = "f16" }}\n')
    out = tmp_path / "out"
    assert_clean_failure(run_cli("run", recipe, "--out", out), message, out)


GOOD_ROWS = [{"name": "reference", "size_bytes": 1000, "ppl": 10.0, "ppl_delta_pct": 0.0,
              "decode_tps": 5.0},
             {"name": "q4", "size_bytes": 300, "ppl": 11.0, "ppl_delta_pct": 10.0,
              "decode_tps": 9.0}]


@pytest.mark.parametrize("field, value", [("size_bytes", "big"), ("ppl", [1]),
                                          ("decode_tps", True), ("weights", 4),
                                          ("steps", "gptq")])
@pytest.mark.parametrize("command", ["compare", "report"])
def test_a_report_with_a_field_of_the_wrong_type_is_one_line(tmp_path, field, value, command):
    rows = json.loads(json.dumps(GOOD_ROWS))
    rows[1][field] = value
    (tmp_path / "report.json").write_text(json.dumps({"variants": rows}))
    args = ["compare", tmp_path, tmp_path] if command == "compare" else ["report", tmp_path]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert f"has {field} = " in result.stderr or "steps that are not" in result.stderr
    assert "Traceback" not in result.stderr and sorted(os.listdir(tmp_path)) == ["report.json"]


def test_null_and_non_finite_figures_are_shown_as_dashes_and_nan(tmp_path):
    rows = json.loads(json.dumps(GOOD_ROWS))
    rows[1].update(size_bytes=None, ppl_delta_pct=None, decode_tps=float("nan"))
    (tmp_path / "report.json").write_text(json.dumps({"variants": rows}))
    result = run_cli("compare", tmp_path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| q4 | – → – | – | – → – | nan → nan |" in result.stdout


def test_report_needs_the_sections_report_md_shows(tmp_path):
    """A report the gate accepts (variants only) is not enough to write report.md."""
    (tmp_path / "report.json").write_text(json.dumps({"variants": GOOD_ROWS}))
    assert run_cli("gate", tmp_path / "report.json", "--max-size-mb", 1).returncode == 0
    result = run_cli("report", tmp_path)
    assert_clean_failure(result, "lacks model.source")
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


@pytest.mark.parametrize("target, message", [("{tmp}", "is a folder"),
                                             ("{tmp}/no/such/table.md", "does not exist")])
def test_compare_markdown_into_a_folder_or_a_missing_one_is_refused(tmp_path, target, message):
    (tmp_path / "report.json").write_text(json.dumps({"variants": GOOD_ROWS}))
    result = run_cli("compare", tmp_path, tmp_path, "--markdown", target.format(tmp=tmp_path))
    assert_clean_failure(result, message)
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


@pytest.mark.parametrize("tables, message", [
    ('[eval]\nctx = 1024\nmax_tokens = 4096\n', "context of 512 tokens"),
    ('[eval]\nctx = 64\nmax_tokens = 256\ntext = "wikitext-2-valid"\n'
     '[calibration]\ntext = "{valid}"\n', "is the evaluation text"),
    ('[eval]\nctx = 64\nmax_tokens = 256\n', "model.trust_remote_code"),
], ids=["window past the model's context", "calibration on the eval text", "trust_remote_code"])
def test_a_recipe_that_would_measure_something_else_is_refused(tmp_path, tiny_llama, tables, message):
    from conftest import shared_text

    model = f'[model]\nsource = "{tiny_llama}"\n'
    if "trust_remote_code" in message:
        model += "trust_remote_code = true\n"
    variant = ('[[variant]]\nname = "g"\ncompress = [{ method = "gptq" }]\n'
               'export = { format = "gguf", weights = "q4_0" }\n')
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(model + tables.format(valid=shared_text("wikitext-2-valid.txt")) + variant)
    out = tmp_path / "out"
    assert_clean_failure(run_cli("run", recipe, "--out", out), message, out)


@pytest.mark.parametrize("command", ["export", "compress"])
def test_there_is_no_trust_remote_code_option(tiny_llama, command, tmp_path):
    result = run_cli(command, tiny_llama, "--trust-remote-code", "--out", tmp_path / "out")
    assert_clean_failure(result, "No such option: --trust-remote-code", tmp_path / "out")


@pytest.mark.parametrize("in_the_way, message", [("symlink", "is a symlink"),
                                                 ("folder", "edgellm did not make it"),
                                                 ("file", "edgellm did not make it")])
def test_a_variant_folder_edgellm_did_not_make_is_refused_and_kept(tmp_path, tiny_llama,
                                                                   in_the_way, message):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep me")
    if in_the_way == "symlink":
        (out / "f16").symlink_to(elsewhere, target_is_directory=True)
    elif in_the_way == "folder":
        (out / "f16").mkdir()
        (out / "f16" / "keep.txt").write_text("keep me")
    else:
        (out / "f16").write_text("keep me")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_llama}"\n[eval]\nctx = 64\nmax_tokens = 256\n'
                      '[[variant]]\nname = "f16"\nexport = { format = "gguf", weights = "f16" }\n')
    result = run_cli("run", recipe, "--out", out)
    assert_clean_failure(result, message)
    assert sorted(p.name for p in out.iterdir()) == ["f16"]
    assert (elsewhere / "keep.txt").read_text() == "keep me"


@pytest.mark.parametrize("step", ['{ method = "gptq", samples = 20000 }',
                                  '{ method = "wanda", sparsity = 0.5 }'])
def test_calibration_shorter_than_a_step_asks_is_refused_before_the_reference(tmp_path, tiny_llama,
                                                                             step):
    from conftest import shared_text

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[model]\nsource = "{tiny_llama}"\n[eval]\nctx = 64\nmax_tokens = 256\n'
                      f'[calibration]\ntext = "{shared_text("wikitext-2-valid.txt")}"\n'
                      f'samples = {20000 if "wanda" in step else 4}\nseqlen = 64\n'
                      f'[[variant]]\nname = "v"\ncompress = [{step}]\n'
                      'export = { format = "gguf", weights = "q4_0" }\n')
    out = tmp_path / "out"
    assert_clean_failure(run_cli("run", recipe, "--out", out), "fewer than samples × seqlen", out)


@pytest.mark.parametrize("budget", [["--max-ppl-increase-pct", "inf"], ["--max-size-mb", "inf"]])
def test_a_non_finite_auto_choice_budget_is_refused_before_measuring(tmp_path, tiny_llama, budget):
    out = tmp_path / "out"
    assert_clean_failure(run_cli("export", tiny_llama, *budget, "--out", out), "not a finite", out)
