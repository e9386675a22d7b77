"""The llama.cpp runtime (llama-cpp-python): runs GGUF files as laptop and phone apps do.

Scoring asks for logits at every position of a window (the same ids torch saw).
Generation uses a second context without all-position logits, so prefill time is
what an app would see, and decodes one token per step with the KV cache.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp import __version__ as llama_cpp_version

from edgellm.runtimes import Generation, timed_greedy


class LlamaCppRuntime:
    name = "llama.cpp"

    def __init__(self, path: str, threads: int, ctx: int):
        self.path, self.threads, self.ctx = path, threads, ctx
        self.version = f"llama-cpp-python {llama_cpp_version}"
        self._llm: Llama | None = None
        self._all_logits: bool | None = None
        self._n_ctx = 0

    def _context(self, all_logits: bool, n_ctx: int) -> Llama:
        """A llama.cpp context of at least n_ctx tokens, reused while it fits."""
        if self._llm is None or self._all_logits != all_logits or self._n_ctx < n_ctx:
            self.close()
            self._llm = Llama(
                model_path=self.path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                n_threads=self.threads, n_threads_batch=self.threads,
                logits_all=all_logits, verbose=False,
            )
            self._all_logits, self._n_ctx = all_logits, n_ctx
        return self._llm

    def window_logits(self, window: np.ndarray) -> np.ndarray:
        llm = self._context(all_logits=True, n_ctx=max(self.ctx, len(window)))
        llm.reset()
        llm.eval(window.tolist())
        return np.array(llm.scores[: len(window) - 1], dtype=np.float32)  # a copy: the next
        # eval overwrites llama.cpp's buffer

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Generation:
        # room for a ctx-long prompt and as many new tokens, so warm-up and timed runs share it
        llm = self._context(all_logits=False, n_ctx=max(2 * self.ctx, len(prompt) + new_tokens))
        llm.reset()

        def run(ids: list[int]) -> np.ndarray:
            llm.eval(ids)
            return self._last_logits(llm)

        return timed_greedy(lambda: run(prompt.tolist()), lambda token: run([token]), new_tokens)

    @staticmethod
    def _last_logits(llm: Llama) -> np.ndarray:
        """Logits of the last evaluated position (the high-level API keeps them only with
        logits_all, so read llama.cpp's buffer directly)."""
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None
