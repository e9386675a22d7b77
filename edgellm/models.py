"""Resolve a model source (built-in name, HF folder, .gguf file, hub id) and load it with transformers.

Loading rules: safetensors only, their headers checked before loading; pickle checkpoints
refused unless the user passes --allow-pickle (then read with torch's `weights_only=True`
and saved as safetensors at once); model code from a folder or the hub never runs (only
the families of edgellm/archs/, which transformers implements, are read); a folder whose
weights do not cover its config is refused rather than run with random tensors;
GGUF files are dequantized by transformers (`gguf_file=`) and their quantizer state is
dropped so the model can be saved as a plain HF folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from edgellm.builtin_models import BUILTIN_MODELS, builtin_gguf_path
from edgellm.errors import UserError
from edgellm.gguf_bounds import check_gguf_layout
from edgellm.model_folder import (
    check_loading_info,
    check_safetensors_header,
    check_shapes,
    safetensors_header,
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is 'hf' (folder or hub id) or 'gguf'."""

    kind: str
    path: str  # folder, hub id, or the folder holding the .gguf file
    gguf_file: str | None = None
    label: str = ""
    pickle: bool = False  # an HF folder with pickle weights the user allowed (--allow-pickle)

    def files(self) -> list[Path]:
        """The files whose content identifies this model (for content hashing)."""
        if self.kind == "gguf":
            return [Path(self.path) / self.gguf_file]
        folder = Path(self.path)
        if not folder.is_dir():
            return []
        keep = (".safetensors", ".json", ".model", ".txt", ".jinja", *PICKLE_SUFFIXES)
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in keep)


def resolve_source(source: str, allow_pickle: bool = False) -> ModelSource:
    """Turn the user's model argument into a ModelSource, checking it exists and looks right."""
    if source in BUILTIN_MODELS:
        path = builtin_gguf_path(source)
        return ModelSource("gguf", str(path.parent), path.name, label=source)
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        return _gguf_source(path)
    if path.is_dir():
        return _hf_folder_source(path, allow_pickle)
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
    check_gguf_layout(path)
    return ModelSource("gguf", str(path.parent.resolve()), path.name,
                       label=str(path))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def _hf_folder_source(folder: Path, allow_pickle: bool = False) -> ModelSource:
    from edgellm.model_folder import check_entries, check_json_files

    check_entries(folder)
    if not (folder / "config.json").is_file():
        raise UserError(
            f"model folder {folder} has no config.json: pass a Hugging Face model folder"
        )
    check_json_files(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if weights:
        for path in weights:
            check_safetensors_header(path)
        return ModelSource("hf", str(folder.resolve()), label=str(folder))
    if not any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        raise UserError(f"model folder {folder} has no .safetensors weights: add them")
    if not allow_pickle:
        raise UserError(
            f"model folder {folder} holds only pickle weights (.bin/.pt), which can run code: "
            "convert it to safetensors, or pass --allow-pickle to run, export or compress if you "
            "trust its origin"
        )
    sys.stderr.write(f"warning: reading pickle weights from {folder} (--allow-pickle; "
                     "torch.load with weights_only=True); edgellm saves them as safetensors\n")
    return ModelSource("hf", str(folder.resolve()), label=str(folder), pickle=True)


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


_PARSED_GGUF: dict = {}  # the last GGUF file transformers parsed in this process


@contextlib.contextmanager
def _gguf_parsed_once(source: ModelSource):
    """transformers parses a GGUF's whole header anew for the config, the tokenizer and the
    weights, and gguf-py walks every vocabulary string in Python (6 s per parse for
    SmolLM2's 49k tokens on 2 cores): while loading, the file parsed last in this process
    (same path and mtime) is handed back instead of parsed again."""
    if source.kind != "gguf":
        yield
        return
    import gguf

    parse = gguf.GGUFReader

    def parsed(path, mode="r"):
        key = (os.fspath(path), mode, os.stat(path).st_mtime_ns)
        if key not in _PARSED_GGUF:
            _PARSED_GGUF.clear()
            _PARSED_GGUF[key] = parse(path, mode)
        return _PARSED_GGUF[key]

    gguf.GGUFReader = parsed  # transformers imports it from gguf at each load
    try:
        yield
    finally:
        gguf.GGUFReader = parse


def load_tokenizer(source: ModelSource):
    """Load the tokenizer of a model source."""
    from transformers import AutoTokenizer

    quiet_transformers()
    with _hub_errors(source), _gguf_parsed_once(source):
        tokenizer = AutoTokenizer.from_pretrained(
            source.path, gguf_file=source.gguf_file, trust_remote_code=False,
            local_files_only=_offline(source),
        )
    if source.kind == "gguf":
        pre = gguf_metadata(Path(source.path) / source.gguf_file).get("tokenizer.ggml.pre")
        _restore_pre_tokenizer(tokenizer, pre)
    return tokenizer


def load_model(source: ModelSource, dtype: str = "float32"):
    """Load a causal LM in torch on the CPU, ready to save or to run."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    kwargs = dict(
        dtype=getattr(torch, dtype), trust_remote_code=False,
        local_files_only=_offline(source),
    )
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    elif source.pickle:  # allowed by the user; never unpickle arbitrary objects
        kwargs.update(use_safetensors=False, weights_only=True)
    elif Path(source.path).is_dir():
        with _hub_errors(source):
            return load_folder_model(Path(source.path), dtype)
    else:
        kwargs["use_safetensors"] = True
    with _hub_errors(source), _gguf_parsed_once(source):
        model, info = AutoModelForCausalLM.from_pretrained(source.path, output_loading_info=True,
                                                           **kwargs)
    check_loading_info(info, source.label or source.path)
    if source.kind == "gguf":
        drop_gguf_quantizer(model)
    model.eval()
    return model


def is_packed_folder(folder: Path) -> bool:
    """A folder whose weights only edgellm's own readers understand (a GPTQ checkpoint, a
    torch int8 folder): load_folder_model dequantizes it, llama.cpp's converter cannot read it."""
    from edgellm.gptq_checkpoint import is_gptq_folder
    from edgellm.torch_int8 import is_int8_folder

    return is_gptq_folder(folder) or is_int8_folder(folder)


def load_folder_model(folder: Path, dtype: str = "float32", runtime_quantization: bool = False):
    """A causal LM from a local HF folder edgellm wrote or was given; a GPTQ checkpoint
    is dequantized (the same weights the GGUF and ONNX exports compute with). With
    `runtime_quantization`, a torch int8 folder computes with its int8 tensors (what the
    torch runtime does); without it, it is dequantized (compression steps read float weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.gptq_checkpoint import is_gptq_folder, load_dequantized
    from edgellm.torch_int8 import is_int8_folder, load_int8_model

    quiet_transformers()
    if is_int8_folder(folder):
        model = load_int8_model(Path(folder), dequantize=not runtime_quantization)
        if not runtime_quantization:
            model = model.to(getattr(torch, dtype))
    elif is_gptq_folder(folder):
        model = load_dequantized(Path(folder), getattr(torch, dtype))
    else:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype), use_safetensors=True, local_files_only=True,
            output_loading_info=True)
        check_loading_info(info, folder)
        model.eval()
    return model


def check_weights_cover_config(source: ModelSource) -> None:
    """Before any work: the tensors stored in an HF folder must cover what the architecture
    in its config.json needs. Checked on an empty (meta-device) model, so it costs no memory;
    `check_loading_info` repeats the check when the weights really load."""
    folder = Path(source.path)
    if source.kind != "hf" or source.pickle or not folder.is_dir():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if is_packed_folder(folder):  # their own tensor names, checked by their own readers
        return
    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # unknown model_type, a config transformers cannot build
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"model folder {folder}: its config.json does not describe a causal LM "
                        f"transformers can build ({first}): pass a causal LM folder") from None
    stored = {}
    for path in folder.glob("*.safetensors"):
        stored.update({name: info.get("shape") for name, info in safetensors_header(path).items()
                       if name != "__metadata__"})
    expected = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = set(expected) - set(stored)
    if getattr(config, "tie_word_embeddings", False):
        missing = {name for name in missing if not name.endswith("lm_head.weight")}
    check_loading_info({"missing_keys": sorted(missing)}, folder)
    check_shapes(expected, stored, folder)


def source_family(source: ModelSource):
    """(Family, config dict or None) of a model source: an HF folder's config.json, or a
    GGUF's general.architecture (its config is rebuilt by transformers later)."""
    from edgellm.archs import family_of, family_of_gguf

    name = source.label or source.path
    if source.kind == "gguf":
        arch = gguf_metadata(Path(source.path) / source.gguf_file).get("general.architecture")
        return family_of_gguf(str(arch), name), None
    config_path = Path(source.path) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"model {name}: {config_path} is not readable JSON: fix or replace "
                        "config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"model {name}: {config_path} is not a JSON object: fix config.json")
    return family_of(config, name), config


def context_length(source: ModelSource, config: dict | None) -> int | None:
    """The positions a model was trained for: config.json's max_position_embeddings, or a
    GGUF's {arch}.context_length; None where neither says."""
    if source.kind == "gguf":
        meta = gguf_metadata(Path(source.path) / source.gguf_file, ("",))  # one walk, cached
        value = meta.get(f"{meta.get('general.architecture')}.context_length")
    else:
        value = (config or {}).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def has_tied_head(model) -> bool:
    """Whether the model's logits multiply its token embedding (lm_head tied to it)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


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


def save_hf_folder(model, tokenizer, source: ModelSource, dest: Path) -> dict:
    """Save a loaded model as a plain HF folder (safetensors), noting facts of its source
    that the folder cannot carry (edgellm/source_meta.py); returns those facts."""
    from edgellm.source_meta import write_source_meta

    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    if source.kind == "hf":
        copy_tokenizer_files(Path(source.path), dest)
    return write_source_meta(dest, source, tokenizer)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json",
                   "merges.txt", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def copy_tokenizer_files(source: Path, dest: Path) -> None:
    """The source's own tokenizer files, as they were: transformers re-saves a tokenizer in
    its own layout (no SentencePiece tokenizer.model), and llama.cpp's converter reads them."""
    import shutil

    for name in TOKENIZER_FILES:
        path = source / name
        if path.is_file() and not path.is_symlink():
            shutil.copyfile(path, dest / name)


GGUF_SCALAR_KEYS = ("general.", "tokenizer.ggml.pre", "tokenizer.ggml.bos", "tokenizer.ggml.eos")


def read_gguf(path: Path):
    """gguf-py's reader on a GGUF whose layout was checked first; a parse error is one line."""
    import gguf

    check_gguf_layout(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # gguf-py's parse errors have no common type
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"model file {path} is a corrupt GGUF ({first}): download or export it "
                        "again") from None


def gguf_metadata(path: Path, keys_prefix: tuple[str, ...] = GGUF_SCALAR_KEYS) -> dict:
    """Metadata values of a GGUF file under `keys_prefix` (checked and read once per file)."""
    from edgellm.gguf_bounds import read_gguf_meta

    return read_gguf_meta(path).values(keys_prefix)


def _restore_pre_tokenizer(tokenizer, pre: str | None) -> None:
    """transformers rebuilds a GGUF's BPE tokenizer with a plain ByteLevel pre-tokenizer;
    put back the one llama.cpp uses for this `tokenizer.ggml.pre`, when we know it, so
    torch tokenizes text exactly as llama.cpp does."""
    from tokenizers import Tokenizer

    from edgellm.source_meta import PRE_TOKENIZER_JSON

    backend = getattr(tokenizer, "_tokenizer", None)
    if pre not in PRE_TOKENIZER_JSON or backend is None:
        return
    tokenizer_json = json.loads(backend.to_str())
    tokenizer_json["pre_tokenizer"] = PRE_TOKENIZER_JSON[pre]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(tokenizer_json))
