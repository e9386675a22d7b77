"""`edgellm export --ollama`: a Modelfile beside the GGUF, built from the GGUF's own metadata."""

import json
import shutil

from conftest import run_cli

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_modelfile_names_the_gguf_and_its_stop_token(tmp_path, tiny_llama):
    result = run_cli("export", tiny_llama, "--weights", "q8_0", "--ollama", "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    modelfile = tmp_path / "tiny-llama-q8_0.Modelfile"
    assert f"wrote {modelfile}" in result.stdout
    lines = modelfile.read_text().splitlines()
    assert "FROM ./tiny-llama-q8_0.gguf" in lines and 'PARAMETER stop "</s>"' in lines
    assert not any(line.startswith("TEMPLATE") for line in lines)  # no template to translate


def test_a_chatml_template_is_translated_for_ollama(tmp_path, tiny_llama):
    chat = shutil.copytree(tiny_llama, tmp_path / "chat-llama")
    config = json.loads((chat / "tokenizer_config.json").read_text())
    config["chat_template"] = CHATML
    (chat / "tokenizer_config.json").write_text(json.dumps(config))
    result = run_cli("export", chat, "--ollama", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "out" / "chat-llama-f16.Modelfile").read_text()
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "</s>"' in text


def test_ollama_needs_a_gguf_export(tmp_path, tiny_llama):
    result = run_cli("export", tiny_llama, "--to", "onnx", "--ollama", "--out", tmp_path / "o")
    assert result.returncode == 2 and "--ollama needs --to gguf" in result.stderr
    assert not (tmp_path / "o").exists()
