"""Versions of the tools an artifact was built or measured with, and facts about the machine."""

from __future__ import annotations

import os
import platform
from importlib import metadata

from edgellm import __version__

# every package whose version can key a build or a measurement: each format lists its own
# (export/formats/, `build_tools`), each runtime its own (runtimes/__init__.py, `tools`), and
# tests/test_registries.py checks they are all here
TOOL_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "gguf",
                 "llama-cpp-python", "onnx", "onnx-ir", "onnxruntime", "onnxruntime-genai",
                 "mlx", "mlx-lm")
STEP_TOOLS = ("torch", "transformers")  # compression steps and the saved reference


def tool_versions(packages: tuple[str, ...] = TOOL_PACKAGES) -> dict[str, str]:
    """{package: installed version} of `packages` (missing ones left out), edgellm first."""
    versions = {"edgellm": __version__}
    for package in packages:
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
