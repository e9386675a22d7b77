"""Evaluation and calibration texts: built-in names for the shared data files, reading,
tokenizing once, windows.

The protocol (docs/design.md): the base model's tokenizer turns the text into ids once;
every runtime scores the same ids in non-overlapping windows of `ctx` tokens.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from edgellm.errors import UserError

BUILTIN_TEXTS = {
    "wikitext-2-raw-test": "wikitext-2-raw-test.txt",
    "wikitext-2-valid": "wikitext-2-valid.txt",
}


def data_dirs() -> list[Path]:
    """Where built-in texts are looked for: $EDGELLM_DATA, then ../shared/data beside the repo or cwd."""
    dirs = []
    if os.environ.get("EDGELLM_DATA"):
        dirs.append(Path(os.environ["EDGELLM_DATA"]))
    repo = Path(__file__).resolve().parent.parent
    dirs += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
             Path.cwd() / "shared" / "data"]
    return dirs


def resolve_text(name_or_path: str) -> Path:
    """A built-in text name or a path → an existing file, or a one-line error."""
    if name_or_path in BUILTIN_TEXTS:
        for folder in data_dirs():
            path = folder / BUILTIN_TEXTS[name_or_path]
            if path.is_file():
                return path
        raise UserError(
            f"built-in text '{name_or_path}' not found: set EDGELLM_DATA to the folder "
            f"holding {BUILTIN_TEXTS[name_or_path]}"
        )
    path = Path(name_or_path).expanduser()
    if not path.exists():
        names = ", ".join(BUILTIN_TEXTS)
        raise UserError(f"text file {path} does not exist: pass a path or a built-in name ({names})")
    if not path.is_file():
        raise UserError(f"text {path} is a folder: pass a UTF-8 text file")
    return path


def read_text(path: Path) -> tuple[str, str]:
    """The text and its sha256; refuses empty and non-UTF-8 files."""
    raw = path.read_bytes()
    if not raw.strip():
        raise UserError(f"text file {path} is empty: pass a file with text in it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"text file {path} is not UTF-8 (byte {exc.start}): re-encode it as UTF-8"
        ) from None
    return text, hashlib.sha256(raw).hexdigest()


PREFIX_MARGIN = 512  # tokens past max_tokens a prefix must reach to be trusted


def tokenize(tokenizer, text: str, max_tokens: int | None) -> np.ndarray:
    """Token ids of the text (no special tokens added), cut to `max_tokens`.

    With `max_tokens`, a prefix ending at a line break is tokenized instead of the whole
    text (1.5 s for wikitext-2 each time a run starts, against 0.1 s for 16,384 tokens) once
    it yields `PREFIX_MARGIN` tokens more than needed: tokenizers split and merge locally, so
    the ids before the cut are the whole text's (checked on edgellm's tokenizers in
    tests/test_data.py); a prefix too short doubles until it is long enough or is the text."""
    if max_tokens:
        chars = 8 * (max_tokens + PREFIX_MARGIN)
        while chars < len(text):
            cut = text.find("\n", chars)
            if cut < 0:
                break
            ids = tokenizer(text[:cut + 1], add_special_tokens=False)["input_ids"]
            if len(ids) >= max_tokens + PREFIX_MARGIN:
                return np.asarray(ids[:max_tokens], dtype=np.int32)
            chars *= 2
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    return np.asarray(ids, dtype=np.int32)


def token_windows(ids: np.ndarray, ctx: int, source: str = "text",
                  bos: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows of exactly `ctx` ids; the tail shorter than a window is dropped.
    With `bos` (the model's tokenizer adds one), each window is BOS then ctx − 1 text ids,
    as llama-perplexity starts each chunk: every target is still a text token."""
    if bos is not None:
        body = token_windows(ids, ctx - 1, source) if ctx > 2 else token_windows(ids, ctx, source)
        return [np.concatenate([np.asarray([bos], dtype=ids.dtype), w]) for w in body]
    if ctx < 2:
        raise UserError(f"ctx {ctx} is too small: use a window of at least 2 tokens")
    count = len(ids) // ctx
    if count == 0:
        raise UserError(
            f"{source} has {len(ids)} tokens, fewer than one window of {ctx}: "
            "use a longer text or a smaller --ctx"
        )
    return [ids[i * ctx:(i + 1) * ctx] for i in range(count)]


def calibration_windows(model_dir: Path, text: str, samples: int, seqlen: int) -> list[np.ndarray]:
    """Up to `samples` windows of `seqlen` ids of the calibration text, BOS first where the
    model's tokenizer adds it (as the evaluation windows)."""
    from transformers import AutoTokenizer

    from edgellm.source_meta import bos_of_folder

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    path = resolve_text(text)
    bos = bos_of_folder(model_dir)
    ids = tokenize(tokenizer, read_text(path)[0], samples * (seqlen - (bos is not None)))
    return token_windows(ids, seqlen, source=str(path), bos=bos)
