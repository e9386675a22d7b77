"""Child process of llama_converter.convert: runs llama.cpp's convert_hf_to_gguf.py with the
converter's own gguf-py, and edgellm's few additions through its class hooks.

argv: converter folder, a JSON of additions (or ""), then convert_hf_to_gguf.py's arguments.
The additions: `vocab`, a GGUF source's tokenizer.* fields written instead of the
converter's tokenizer (its own vocabulary, exactly); `extra`, fields a family adds that the
converter omits (edgellm/archs/); and $EDGELLM_GGUF_PRE, the pre-tokenizer name to use where
the converter's probe hash is unknown.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import types
from pathlib import Path


def add_fields(writer, fields: dict) -> None:
    """{key: {"type", "sub_type", "value"}} into a GGUFWriter."""
    import gguf

    for key, field in fields.items():
        sub = gguf.GGUFValueType(field["sub_type"]) if field["sub_type"] is not None else None
        writer.add_key_value(key, field["value"], gguf.GGUFValueType(field["type"]), sub)


def with_additions(additions: dict) -> None:
    from conversion.base import TextModel

    original = TextModel.prepare_metadata

    def prepare_metadata(self, vocab_only: bool):
        if additions.get("vocab"):
            self.set_vocab = types.MethodType(lambda model: add_fields(model.gguf_writer,
                                                                       additions["vocab"]), self)
        original(self, vocab_only)
        add_fields(self.gguf_writer, additions.get("extra") or {})

    TextModel.prepare_metadata = prepare_metadata


def known_pre(name: str) -> None:
    """get_vocab_base_pre falls back on `name` where the converter's hash is unknown."""
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    converter, additions, args = Path(argv[0]), argv[1], argv[2:]
    sys.path[0:0] = [str(converter / "gguf-py"), str(converter)]
    if additions:
        with_additions(json.loads(Path(additions).read_text(encoding="utf-8")))
    if os.environ.get("EDGELLM_GGUF_PRE"):
        known_pre(os.environ["EDGELLM_GGUF_PRE"])
    sys.argv = [str(converter / "convert_hf_to_gguf.py"), *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
