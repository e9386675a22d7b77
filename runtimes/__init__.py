"""Runtimes: each artifact format runs in its real engine behind one small interface.

`RUNTIMES` is the runtime registry, keyed by the runtime's name, with the formats each
opens and the packages whose versions key its measurements; a format lists the runtimes
that open it (export/formats/), the first by default, so a second engine for a format
is one more entry here and one more name there.

A runtime returns the next-token logits at every position of a window of token ids (the
caller scores them: perplexity, KL divergence from the reference) and runs timed greedy
generation with a KV cache. Modules are imported
lazily so a measuring process loads only the runtime it needs (no torch thread pool
beside llama.cpp's).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgellm.divergence import log_normalizer


@dataclass(frozen=True)
class RuntimeEntry:
    module: str
    cls: str
    formats: tuple[str, ...]  # artifact formats it opens
    tools: tuple[str, ...]  # packages whose versions key a measurement (in tools.TOOL_PACKAGES)
    takes_provider: bool = False  # accepts an execution provider (ONNX Runtime's)


# runtime name (its `name` attribute) → where it lives. One line per runtime.
RUNTIMES = {
    "torch": RuntimeEntry("edgellm.runtimes.pytorch", "TorchRuntime", ("torch",),
                          ("torch", "transformers")),
    "llama.cpp": RuntimeEntry("edgellm.runtimes.llamacpp", "LlamaCppRuntime", ("gguf",),
                              ("llama-cpp-python",)),
    "onnxruntime": RuntimeEntry("edgellm.runtimes.ort", "OrtRuntime", ("onnx", "ort"),
                                ("onnxruntime", "onnxruntime-genai"), takes_provider=True),
    "mlx": RuntimeEntry("edgellm.runtimes.mlx", "MlxRuntime", ("mlx",), ("mlx", "mlx-lm")),
}


@dataclass
class Generation:
    """Greedy tokens from one prompt, with the time each phase took (seconds)."""

    tokens: list[int] = field(default_factory=list)
    prefill_s: float = 0.0  # prompt forward pass, logits of the last position ready
    ttft_s: float = 0.0  # from the call until the first new token is chosen
    decode_s: float = 0.0  # the remaining len(tokens) - 1 steps


class Runtime(Protocol):
    name: str
    version: str

    def window_logits(self, window: np.ndarray) -> np.ndarray:
        """float32 logits [len(window) - 1, vocab]: row i predicts window[i + 1]."""

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Generation:
        """Greedy generation: one prefill, then one cached step per token."""

    def close(self) -> None:
        """Free the model."""


def runtime_for(fmt: str, name: str | None = None) -> str:
    """The runtime `name` if it opens `fmt`, else the first registered one that does."""
    if name is not None:
        if name not in RUNTIMES or fmt not in RUNTIMES[name].formats:
            raise ValueError(f"runtime '{name}' does not open {fmt} artifacts")
        return name
    for runtime, entry in RUNTIMES.items():
        if fmt in entry.formats:
            return runtime
    raise ValueError(f"no runtime for format '{fmt}' (known: {', '.join(RUNTIMES)})")


def open_runtime(fmt: str, path: str, threads: int, ctx: int,
                 provider: str | None = None, runtime: str | None = None) -> Runtime:
    """Open the `fmt` artifact at `path` in `runtime` (by default the first that opens the
    format); `provider` picks ONNX Runtime's execution provider (others ignore it)."""
    entry = RUNTIMES[runtime_for(fmt, runtime)]
    runtime_class = getattr(importlib.import_module(entry.module), entry.cls)
    if provider and entry.takes_provider:
        return runtime_class(path, threads=threads, ctx=ctx, provider=provider)
    return runtime_class(path, threads=threads, ctx=ctx)


def timed_greedy(prefill, step, new_tokens: int) -> Generation:
    """Greedy decoding with the timings every runtime reports. `prefill()` runs the prompt and
    returns the last position's logits; `step(token)` feeds one token through the KV cache
    and returns the next logits (numpy arrays or torch tensors)."""
    start = time.perf_counter()
    logits = prefill()
    prefill_done = time.perf_counter()
    token = argmax(logits)
    first = time.perf_counter()
    tokens = [token]
    for _ in range(new_tokens - 1):
        token = argmax(step(token))
        tokens.append(token)
    end = time.perf_counter()
    return Generation(tokens, prefill_done - start, first - start, end - first)


def argmax(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def nll_of_targets(logits: np.ndarray, targets: np.ndarray,
                   log_norm: np.ndarray | None = None) -> float:
    """Sum over rows of -log softmax(logits)[target] (`log_norm`: the rows' log-sum-exp,
    when the caller has it)."""
    log_norm = log_normalizer(logits) if log_norm is None else log_norm
    picked = logits[np.arange(len(targets)), targets].astype(np.float64)
    return float((log_norm - picked).sum())


def window_nll(runtime: Runtime, window: np.ndarray) -> tuple[float, int]:
    """Sum of the NLL of window[1:] given its prefix in `runtime`, and how many tokens."""
    return nll_of_targets(runtime.window_logits(window), window[1:]), len(window) - 1
