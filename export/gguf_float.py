"""HF folder → float GGUF (f32, f16, bf16) with llama.cpp's own converter
(export/llama_converter.py): a GPTQ checkpoint is dequantized first; a GGUF source's own
vocabulary, the family's extra fields and the source's general.* travel with it. Both the
quantized types (export/gguf.py) and GPTQ blocks (export/gguf_gptq.py) start from it."""

from __future__ import annotations

import json
from pathlib import Path

from edgellm.archs import family_of
from edgellm.artifacts import atomic_path
from edgellm.source_meta import GGUF_VOCAB as VOCAB
from edgellm.source_meta import SOURCE_META


def write_float_gguf(folder: Path, out_path: Path, weights: str, work: Path) -> None:
    """Convert an HF folder to a float GGUF with llama.cpp's converter (a GPTQ checkpoint or
    a torch int8 folder is dequantized first, into `work`)."""
    from edgellm.export.llama_converter import convert
    from edgellm.models import is_packed_folder

    folder = Path(folder)
    if is_packed_folder(folder):
        folder = dequantized_folder(folder, work)
    config = json.loads((folder / "config.json").read_text())
    family = family_of(config, str(folder))
    vocab_path = folder / VOCAB
    vocab = json.loads(vocab_path.read_text(encoding="utf-8")) if vocab_path.is_file() else None
    extra = family.gguf_extra(config) if family.gguf_extra else {}
    with atomic_path(out_path) as tmp:
        convert(folder, tmp, weights, work, vocab, extra, source_general(folder))


def f32_intermediate(folder: Path, work: Path) -> Path:
    """work/model-f32.gguf, written once: what quantized types, GPTQ blocks and size
    budgets all start from (`work` is keyed by the model's content)."""
    path = Path(work) / "model-f32.gguf"
    if not path.is_file():
        write_float_gguf(folder, path, "f32", work)
    return path


def dequantized_folder(folder: Path, work: Path) -> Path:
    """The float weights a GPTQ checkpoint (or an int8 folder) computes with, saved once as
    an HF folder."""
    import shutil

    from edgellm.artifacts import sha256_files
    from edgellm.model_folder import copy_side_files
    from edgellm.models import load_folder_model

    key = sha256_files(sorted(folder.glob("*.safetensors")))[:12]
    dest = work / f"dequantized-{key}"
    if (dest / "config.json").is_file():
        return dest
    staging = work / f".dequantized-{key}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        load_folder_model(folder).save_pretrained(staging, safe_serialization=True)
        copy_side_files(folder, staging, overwrite=False)
        staging.replace(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


# what llama.cpp's converter would read off the folder's name: edgellm's folders are named
# by their role and key (reference, steps/gptq-<key>, dequantized-<key>), never the model's
FOLDER_NAME_KEYS = ("general.organization", "general.basename", "general.finetune",
                    "general.version")


def source_general(folder: Path) -> dict:
    """general.* metadata the source carried (a GGUF's own, or the source's name), which
    apps such as LM Studio and Ollama show; not the output folder's name: the keys the
    converter would guess from it are cleared, so every GGUF made from one source carries
    the same metadata whichever compressed or dequantized folder it came from."""
    meta_path = Path(folder) / SOURCE_META
    general = json.loads(meta_path.read_text()).get("general") or {} if meta_path.is_file() else {}
    return {**dict.fromkeys(FOLDER_NAME_KEYS), **general}
