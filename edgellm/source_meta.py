"""Facts of a model's source that its saved HF folder cannot carry, kept beside the weights.

`edgellm_source.json` records where the model came from, its general.* metadata (the name
apps show), and whether its text starts with a BOS token. For a GGUF source that flag is
`tokenizer.ggml.add_bos_token`: the tokenizer transformers rebuilds from a GGUF reports
`add_bos_token = False` even where the GGUF says true (Gemma 3), so the flag is read from
the source, never from the rebuilt tokenizer. `edgellm_gguf_vocab.json` keeps a GGUF
source's tokenizer.* fields so its GGUF exports carry the source's own vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

SOURCE_META = "edgellm_source.json"
GGUF_VOCAB = "edgellm_gguf_vocab.json"
# What tokenizer.json's pre_tokenizer is for a llama.cpp pre name: transformers' GGUF
# tokenizer conversion writes plain ByteLevel for every BPE vocabulary, which loses
# SmolLM's split of digits; it is restored so torch tokenizes as llama.cpp does.
PRE_TOKENIZER_JSON = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
              "use_regex": True},
}
# general.* keys that describe the file, not the model: the writer sets its own
FILE_KEYS = ("general.architecture", "general.file_type", "general.quantization_version",
             "general.alignment")


def gguf_fields(path: Path, prefix: str | tuple[str, ...]) -> dict:
    """{key: {"type", "sub_type", "value"}} of a GGUF's metadata fields under `prefix`."""
    from edgellm.gguf_bounds import read_gguf_meta

    return {key: {"type": kind, "sub_type": sub, "value": value}
            for key, (kind, sub, value) in read_gguf_meta(path).fields.items()
            if key.startswith(prefix) and key not in FILE_KEYS}


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether an HF tokenizer puts BOS first when asked for special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_specials) and with_specials[0] == bos


def write_source_meta(dest: Path, source, tokenizer) -> dict:
    """Write edgellm_source.json (and a GGUF source's vocabulary) into the HF folder `dest`."""
    meta = {"source": source.label or source.path, "kind": source.kind}
    if source.kind == "gguf":
        fields = gguf_fields(Path(source.path) / source.gguf_file, ("tokenizer.", "general."))
        vocab = {k: f for k, f in fields.items() if k.startswith("tokenizer.")}
        (dest / GGUF_VOCAB).write_text(json.dumps(vocab), encoding="utf-8")
        meta["general"] = {k: f["value"] for k, f in fields.items()
                           if k.startswith("general.") and isinstance(f["value"], (str, int, float))}
        meta["tokenizer_pre"] = vocab.get("tokenizer.ggml.pre", {}).get("value")
        add_bos = bool(vocab.get("tokenizer.ggml.add_bos_token", {}).get("value", False))
        bos_id = vocab.get("tokenizer.ggml.bos_token_id", {}).get("value")
    else:
        meta["general"] = {"general.name": _hf_name(source)}
        add_bos, bos_id = tokenizer_adds_bos(tokenizer), tokenizer.bos_token_id
    meta["add_bos_token"] = bool(add_bos and bos_id is not None)
    meta["bos_token_id"] = bos_id if meta["add_bos_token"] else None
    (dest / SOURCE_META).write_text(json.dumps(meta, indent=2) + "\n")
    if source.kind == "gguf":  # an HF source's own tokenizer files are kept as they are
        _align_tokenizer_config(dest, meta["add_bos_token"])
    return meta


def _hf_name(source) -> str:
    """A folder's or hub id's last part: what the model is called, not edgellm's folder."""
    label = (source.label or source.path).rstrip("/")
    return Path(label).name or label


def _align_tokenizer_config(dest: Path, add_bos: bool) -> None:
    """Make the saved tokenizer_config.json say what the source does about BOS."""
    path = dest / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("add_bos_token") != add_bos:
        config["add_bos_token"] = add_bos
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_source_meta(folder: Path) -> dict:
    path = Path(folder) / SOURCE_META
    return json.loads(path.read_text()) if path.is_file() else {}


def bos_of_folder(folder: Path, tokenizer=None) -> int | None:
    """The BOS id every window of this model starts with, or None (edgellm's own folders
    say it in edgellm_source.json; another HF folder is asked through its tokenizer, loaded
    from the folder unless given)."""
    meta = read_source_meta(folder)
    if "add_bos_token" in meta:
        return meta.get("bos_token_id") if meta["add_bos_token"] else None
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None


def source_bos(source, tokenizer) -> int | None:
    """The BOS id a source model's text starts with, or None: a GGUF's own
    tokenizer.ggml.add_bos_token, else what the HF folder or tokenizer says."""
    if source.kind == "gguf":
        from edgellm.gguf_bounds import read_gguf_meta

        flags = read_gguf_meta(Path(source.path) / source.gguf_file).values(
            ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id"))
        bos = flags.get("tokenizer.ggml.bos_token_id")
        return int(bos) if flags.get("tokenizer.ggml.add_bos_token") and bos is not None else None
    return bos_of_folder(Path(source.path), tokenizer)
