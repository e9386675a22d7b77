"""An Ollama Modelfile beside an exported GGUF: `ollama create NAME -f X.Modelfile` serves it.

Everything comes from the GGUF itself: the file name (FROM), its stop tokens (the end of
sequence token and, for ChatML templates, `<|im_end|>`), and the chat template. Ollama
writes templates in Go's text/template language, not Jinja; edgellm translates only the
template family it can recognise with certainty (ChatML, as SmolLM2, Qwen and many others
use) and otherwise leaves TEMPLATE out, which makes Ollama fall back on its own detection
of the GGUF's `tokenizer.chat_template`.
"""

from __future__ import annotations

from pathlib import Path

from edgellm.artifacts import write_text_atomic
from edgellm.gguf_bounds import read_gguf_meta

# Ollama's ChatML template (the form its library uses for ChatML models), with tools left out
CHATML_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def modelfile_text(gguf_path: Path) -> str:
    """The Modelfile for one GGUF file, which it names relative to itself (same folder)."""
    fields = read_gguf_meta(gguf_path).values()  # {key: value}
    template = _text(fields, "tokenizer.chat_template") or ""
    stops = []
    eos = _token(fields, "tokenizer.ggml.eos_token_id")
    if eos:
        stops.append(eos)
    chatml = "<|im_start|>" in template and "<|im_end|>" in template
    if chatml and "<|im_end|>" not in stops:
        stops.append("<|im_end|>")
    lines = [f"# written by edgellm for {gguf_path.name}", f"FROM ./{gguf_path.name}"]
    if chatml:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
    lines += [f'PARAMETER stop "{_quote(stop)}"' for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: Path) -> Path:
    """Write `<name>.Modelfile` beside `<name>.gguf` (one per GGUF, so several exports can
    share a folder)."""
    path = Path(gguf_path).with_suffix(".Modelfile")
    write_text_atomic(path, modelfile_text(Path(gguf_path)))
    return path


def _text(fields: dict, key: str) -> str | None:
    value = fields.get(key)
    return str(value) if value is not None else None


def _token(fields: dict, key: str) -> str | None:
    """The text of the token whose id the GGUF stores under `key`."""
    token_id, tokens = fields.get(key), fields.get("tokenizer.ggml.tokens")
    if token_id is None or tokens is None:
        return None
    index = int(token_id)
    return tokens[index] if 0 <= index < len(tokens) else None


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
