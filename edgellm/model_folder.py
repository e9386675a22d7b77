"""What an HF model folder may hold before edgellm reads it: regular files reached without
leaving the folder, JSON side files that parse, and safetensors headers that agree with
their own byte ranges.

Each check names the file and the fix in one line (UserError), so a broken folder is
refused before any work instead of failing inside transformers, the converter or a
runtime. A symlink is followed only to a regular file inside the folder, or, in a Hugging
Face cache snapshot (`models--org--name/snapshots/<rev>/`), to that repository's blobs.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from edgellm.errors import UserError

# side files edgellm, transformers or llama.cpp's converter parse as JSON objects
JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "model.safetensors.index.json", "added_tokens.json")
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def check_entries(folder: Path) -> None:
    """Refuse a folder entry that is a special file (FIFO, socket, device), or a symlink
    that loops, dangles or leads out of the folder. Hidden entries (.git, .cache) are not
    read and not checked."""
    folder = Path(folder)
    root = folder.resolve()
    allowed = [root, *_hf_cache_blobs(root)]
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        info = entry.lstat()
        if stat.S_ISLNK(info.st_mode):
            info = _follow(entry, allowed)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            raise UserError(f"model folder {folder}: {entry.name} is {_kind(info.st_mode)}, not a "
                            "file: edgellm reads a model folder only through regular files; "
                            "remove it")


def _follow(entry: Path, allowed: list[Path]) -> os.stat_result:
    where = f"model folder {entry.parent}: {entry.name} is a symlink"
    try:
        target = entry.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        raise UserError(f"{where} that loops: replace it with the file") from None
    except OSError as exc:
        what = "that loops" if exc.errno == 40 else f"to {os.readlink(entry)}, which does not exist"
        raise UserError(f"{where} {what}: replace it with the file") from None
    if not any(target == base or base in target.parents for base in allowed):
        raise UserError(f"{where} to {target}, outside the folder: copy the file into the "
                        "folder (edgellm reads nothing outside the model's folder)")
    return target.stat()


def _hf_cache_blobs(root: Path) -> list[Path]:
    """The blobs folder of a Hugging Face cache snapshot, where its symlinks lead."""
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        return [root.parent.parent / "blobs"]
    return []


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def check_json_files(folder: Path) -> None:
    """Each JSON side file present must be UTF-8 JSON holding an object."""
    for name in JSON_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_bytes())
        except (ValueError, UnicodeDecodeError) as exc:
            why = str(exc).splitlines()[0][:120]
            raise UserError(f"model folder {folder}: {name} is not valid JSON ({why}): "
                            "download or save it again") from None
        if not isinstance(value, dict):
            raise UserError(f"model folder {folder}: {name} is not a JSON object: download or "
                            "save it again")


def check_tensor_extents(path: Path, header: dict) -> None:
    """Every tensor of a safetensors header: a known dtype, a shape of whole numbers, and
    dtype size × elements = the bytes its data_offsets span."""
    from edgellm.models import corrupt_safetensors

    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = info.get("dtype"), info.get("shape")
        if dtype not in DTYPE_BYTES:
            raise corrupt_safetensors(path, f"tensor {name} has dtype {dtype!r}, which edgellm "
                                            f"does not read ({', '.join(DTYPE_BYTES)})")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise corrupt_safetensors(path, f"tensor {name} has no valid shape")
        start, end = info["data_offsets"]
        expected = DTYPE_BYTES[dtype] * math.prod(shape)
        if end - start != expected:
            raise corrupt_safetensors(path, f"tensor {name} is {dtype} {shape}: {expected} bytes, "
                                            f"but its data spans {end - start}")
