"""The torch runtime: the reference. Runs an HF folder with transformers on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from edgellm.runtimes import Generation, timed_greedy


class TorchRuntime:
    name = "torch"

    def __init__(self, path: str, threads: int, ctx: int):
        from edgellm.models import load_folder_model

        torch.set_num_threads(threads)
        self.version = f"torch {torch.__version__}"
        self.model = load_folder_model(path, runtime_quantization=True)

    @torch.inference_mode()
    def window_logits(self, window: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(window.astype(np.int64))[None]
        return self.model(input_ids=ids, use_cache=False).logits[0, :-1].float().numpy()

    @torch.inference_mode()
    def generate(self, prompt: np.ndarray, new_tokens: int) -> Generation:
        past = None

        def run(ids: torch.Tensor, **kwargs) -> np.ndarray:
            nonlocal past
            out = self.model(input_ids=ids, past_key_values=past, use_cache=True, **kwargs)
            past = out.past_key_values
            return out.logits[0, -1].numpy()

        prompt_ids = torch.from_numpy(prompt.astype(np.int64))[None]
        return timed_greedy(lambda: run(prompt_ids, logits_to_keep=1),
                            lambda token: run(torch.tensor([[token]])), new_tokens)

    def close(self) -> None:
        del self.model
