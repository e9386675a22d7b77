"""What an HF model folder may hold before edgellm reads it: regular files reached without
leaving the folder, JSON side files that parse, safetensors headers that agree with their
own byte ranges, and weights that fill the architecture of config.json with the shapes it
implies (`check_shapes`, `check_loading_info`); and which of its files travel with a
derived folder (`copy_side_files`).

Each check names the file and the fix in one line (UserError), so a broken folder is
refused before any work instead of failing inside transformers, the converter or a
runtime. A symlink is followed only to a regular file inside the folder, or, in a Hugging
Face cache snapshot (`models--org--name/snapshots/<rev>/`), to that repository's blobs.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
from pathlib import Path

from edgellm.errors import UserError

# side files edgellm, transformers or llama.cpp's converter parse as JSON objects
JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "model.safetensors.index.json", "added_tokens.json")
INDEX = "model.safetensors.index.json"
SKIP_FILES = {"manifest.json", "measurement.json", INDEX}  # edgellm's records, the shard index
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
        what = "that loops" if exc.errno == errno.ELOOP else f"to {os.readlink(entry)}, which does not exist"
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


def corrupt_safetensors(path: Path, why: str) -> UserError:
    return UserError(f"model file {path} is truncated or corrupt ({why}): "
                     "download or save the model again")


def check_tensor_extents(path: Path, header: dict) -> None:
    """Every tensor of a safetensors header: a known dtype, a shape of whole numbers, and
    dtype size × elements = the bytes its data_offsets span."""
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


def copy_side_files(source: Path, dest: Path, overwrite: bool = True) -> None:
    """Config, tokenizer and other small files of an HF folder (not its weights, not
    edgellm's records); with `overwrite` False, only those `dest` lacks."""
    for path in Path(source).iterdir():
        side = path.is_file() and path.suffix != ".safetensors" and path.name not in SKIP_FILES
        if side and (overwrite or not (dest / path.name).exists()):
            shutil.copy2(path, dest / path.name)


MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


def header_bytes(path: Path) -> int:
    import struct

    with open(path, "rb") as handle:
        prefix = handle.read(8)
    return struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1


def safetensors_header(path: Path) -> dict:
    """The JSON header of a .safetensors file (tensor names, dtypes, shapes, offsets), read
    with its length bounded by the file's size."""
    def corrupt(why: str) -> UserError:
        return corrupt_safetensors(path, why)

    length = header_bytes(path)
    if length < 0:
        raise corrupt("no header")
    if length > min(MAX_SAFETENSORS_HEADER, path.stat().st_size - 8):
        raise corrupt(f"header claims {length} bytes")
    with open(path, "rb") as handle:
        handle.seek(8)
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError):
            raise corrupt("header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    return header


def check_safetensors_header(path: Path) -> None:
    """Refuse a truncated or corrupt .safetensors file from its header alone, before a
    loader maps it: the header must be JSON of a sane length, and every tensor's byte
    range must lie inside the file."""
    header = safetensors_header(path)
    data_bytes = path.stat().st_size - 8 - header_bytes(path)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise corrupt_safetensors(path, f"tensor {name} has no valid data_offsets")
        if offsets[1] > data_bytes:
            raise corrupt_safetensors(path, f"tensor {name} ends at byte {offsets[1]}, the data "
                                            f"holds {data_bytes}")
    from edgellm.model_folder import check_tensor_extents

    check_tensor_extents(path, header)


def check_shapes(expected: dict[str, list[int]], stored: dict[str, list[int]], folder: Path) -> None:
    """Every stored tensor the architecture uses has the shape its config.json implies: a
    config whose hidden_size (or head or layer counts) disagrees with the weights would
    otherwise export a GGUF llama.cpp cannot load."""
    for name in sorted(set(expected) & set(stored)):
        if stored[name] != expected[name]:
            raise UserError(f"model folder {folder}: tensor {name} is {stored[name]} but config.json "
                            f"implies {expected[name]}: the config and the weights do not belong "
                            "together; fix config.json")


def check_loading_info(info: dict, name) -> None:
    """Refuse a model whose weight files do not fill the architecture its config names
    (transformers would run the missing tensors at their random initial values)."""
    missing = info.get("missing_keys") or []
    if missing:
        listed = ", ".join(sorted(missing)[:3]) + (" ..." if len(missing) > 3 else "")
        raise UserError(f"model {name}: its weights lack {len(missing)} tensor(s) the "
                        f"architecture in config.json needs ({listed}): the config and weights "
                        "do not belong together; fix config.json or pass the right folder")


# config.json key of a torch export with weights "int8": quantize when the runtime loads it
