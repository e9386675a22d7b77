"""The MLX runtime (mlx-lm): runs an MLX export as a Mac app would, on the GPU with Metal
there and on the CPU with `mlx[cpu]` here. Scoring runs a window without a cache;
generation prefills once and then feeds one token per step through mlx-lm's KV cache."""

from __future__ import annotations

import numpy as np

from edgellm.runtimes import Generation, timed_greedy


class MlxRuntime:
    name = "mlx"

    def __init__(self, path: str, threads: int, ctx: int):
        import mlx.core as mx
        from mlx_lm import load

        self.mx = mx
        self.model, _ = load(path)
        self.version = f"mlx {mx.__version__} ({mx.default_device()})"

    def _logits(self, ids: np.ndarray, cache=None) -> np.ndarray:
        mx = self.mx
        out = self.model(mx.array(ids.astype(np.int32))[None], cache=cache)
        return np.array(out[0].astype(mx.float32))

    def window_logits(self, window: np.ndarray) -> np.ndarray:
        return self._logits(window)[:-1]

    def generate(self, prompt: np.ndarray, new_tokens: int) -> Generation:
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        return timed_greedy(lambda: self._logits(prompt, cache)[-1],
                            lambda token: self._logits(np.array([token]), cache)[-1], new_tokens)

    def close(self) -> None:
        self.model = None
