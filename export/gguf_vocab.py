"""Tokenizer → GGUF metadata (BPE/gpt2-style vocabularies): tokens, types, merges, specials.

llama.cpp picks its pre-tokenizer regex from `tokenizer.ggml.pre`. convert_hf_to_gguf.py
finds it by hashing the tokenizer's output on a probe text; we fingerprint the
tokenizer.json pre_tokenizer section instead (no tokenizer code runs) and keep a table.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from edgellm.artifacts import sha256_json
from edgellm.errors import UserError

# sha256 of tokenizer.json's "pre_tokenizer" → llama.cpp pre-tokenizer name.
PRE_TOKENIZERS: dict[str, str] = {
    # Sequence[Digits(individual), ByteLevel]: SmolLM/StarCoder
    "88e46f2b7ff38881b25bdcbd53c00c71a177d17bb9af73bec520e942c76aee6c": "smollm",
    # plain ByteLevel with the GPT-2 regex
    "baad9354616c54e28804f1ac4dc6f27c3032867d2da3f9106a8d12ac859680f0": "gpt-2",
}
# What tokenizer.json's pre_tokenizer is for a llama.cpp pre name: transformers' GGUF
# tokenizer conversion writes plain ByteLevel for every BPE vocabulary, which loses
# SmolLM's split of digits; we restore it so torch tokenizes as llama.cpp does.
PRE_TOKENIZER_JSON = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True},
}
SOURCE_META = "edgellm_source.json"  # written beside a model loaded from GGUF


def pre_tokenizer_name(folder: Path, tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer for this tokenizer, from the source GGUF or the table."""
    meta_path = folder / SOURCE_META
    if meta_path.is_file():
        pre = json.loads(meta_path.read_text()).get("tokenizer_pre")
        if pre:
            return pre
    fingerprint = sha256_json(tokenizer_json.get("pre_tokenizer"))
    if fingerprint in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[fingerprint]
    raise UserError(
        f"tokenizer in {folder} has a pre-tokenizer edgellm does not know "
        f"(fingerprint {fingerprint[:12]}): add it to PRE_TOKENIZERS in export/gguf_vocab.py"
    )


def add_vocab(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> None:
    """Write the tokenizer of the HF folder into the GGUF file."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"model folder {folder} has no tokenizer.json: GGUF export needs one")
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(
            f"tokenizer in {folder} is {model.get('type')}, not BPE: only BPE vocabularies export"
        )
    tokens, types = _tokens_and_types(tokenizer_json, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(folder, tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)


def _tokens_and_types(tokenizer_json: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    by_id: dict[int, str] = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    specials: set[int] = set()
    user_defined: set[int] = set()
    for added in tokenizer_json.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        (specials if added.get("special") else user_defined).add(added["id"])
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in specials
                         else gguf.TokenType.USER_DEFINED if i in user_defined
                         else gguf.TokenType.NORMAL)
    return tokens, types
