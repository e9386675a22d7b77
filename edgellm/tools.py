"""Versions of the tools an artifact was built or measured with, and facts about the machine."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from edgellm import __version__

TOOL_PACKAGES = ("torch", "transformers", "gguf", "llama-cpp-python", "numpy")


def tool_versions() -> dict[str, str]:
    versions = {"edgellm": __version__}
    for package in TOOL_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def machine_info() -> dict:
    import psutil

    return {
        "cpu": _cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
