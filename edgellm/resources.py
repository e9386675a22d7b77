"""Resource guard: before building, estimate the peak memory and the disk a job needs and
refuse at once, with one line, when the machine lacks them (`--force` goes ahead anyway).

The estimates are deliberately rough upper bounds, in multiples of the model's fp32 size
(parameters × 4 bytes): they exist to stop a job that cannot finish before it spends an
hour, not to predict usage. The factors come from runs on SmolLM2-135M (README).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import UserError

GIB = 1 << 30
BASELINE_MEMORY = GIB  # python, torch, transformers and a runtime, before any weights
# peak resident memory while one step runs, in fp32 model sizes (an export's: its format's
# `memory_factor`, export/formats/)
LOAD_MEMORY_FACTOR = 2.5
MEMORY_FACTOR = {"distill": 5.0}  # distill: teacher + student + two Adam moments + grads
COMPRESS_MEMORY_FACTOR = 2.5  # every other method: the model, its copy, calibration state


@dataclass
class Need:
    memory: int  # bytes of RAM at the peak
    disk: int  # bytes written to the output folder
    what: str  # what is being estimated, for the message


def bits_per_weight(fmt: str, weights: str) -> float:
    """Stored bits per parameter of an export, rounded up (block scales included)."""
    from edgellm.export.formats import format_of

    return format_of(fmt).bits_per_weight(weights)


def count_parameters(model_files: list[Path]) -> int:
    """Parameters stored in a model's weight files, read from headers only."""
    total = 0
    for path in model_files:
        if path.suffix == ".gguf":
            from edgellm.gguf_bounds import read_gguf_meta

            total += sum(read_gguf_meta(path).tensors.values())
        elif path.suffix == ".safetensors":
            total += _safetensors_parameters(path)
        elif path.suffix in (".bin", ".pt", ".pth"):
            total += path.stat().st_size // 2  # pickle: no header to read; assume 16-bit
    return total


def _safetensors_parameters(path: Path) -> int:
    import math

    from edgellm.model_folder import safetensors_header

    header = safetensors_header(path)
    return sum(math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__")


def load_need(params: int) -> Need:
    """Loading the source into torch and saving it as an fp32 HF folder."""
    return Need(memory=int(BASELINE_MEMORY + LOAD_MEMORY_FACTOR * params * 4),
                disk=params * 4, what="loading the model")


def export_need(params: int, fmt: str, weights: str, steps: list[str]) -> Need:
    """What one variant costs to build: its compression steps (each an fp32 HF folder on
    disk) and its export (the artifact, plus an fp32 GGUF that quantized types start from)."""
    from edgellm.export.formats import format_of

    target, fp32 = format_of(fmt), params * 4
    factors = [target.memory_factor]
    factors += [MEMORY_FACTOR.get(step, COMPRESS_MEMORY_FACTOR) for step in steps]
    disk = fp32 * len(steps) + params * target.bits_per_weight(weights) / 8
    disk += target.intermediate_bytes(params, weights)
    return Need(memory=int(BASELINE_MEMORY + max(factors) * fp32), disk=int(disk),
                what=f"{fmt} {weights}" + (f" after {' → '.join(steps)}" if steps else ""))


def available_memory() -> int:
    """Bytes of RAM this process can still take: the machine's available memory, or less
    when a cgroup (a container's limit) allows less."""
    import psutil

    available = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def free_disk(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or would hold it, once created)."""
    folder = Path(folder).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_room(needs: list[Need], out: Path, force: bool = False) -> None:
    """Refuse before the work starts when memory or disk will run out; with `force`, say so
    on stderr and go on."""
    if not needs:
        return
    peak = max(needs, key=lambda n: n.memory)
    disk = sum(n.disk for n in needs)
    memory_left, disk_left = available_memory(), free_disk(out)
    problems = []
    if peak.memory > memory_left:
        problems.append(f"{peak.what} needs about {_gib(peak.memory)} of memory and "
                        f"{_gib(memory_left)} is available")
    if disk > disk_left:
        problems.append(f"the outputs need about {_gib(disk)} of disk under {out} and "
                        f"{_gib(disk_left)} is free")
    if not problems:
        return
    if force:
        sys.stderr.write(f"warning: {'; '.join(problems)} (--force: going on)\n")
        return
    raise UserError(f"{'; '.join(problems)}: free memory or disk, choose another --out, "
                    "or pass --force to try anyway")


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"
