"""The diagonal Fisher information of a model's next-token loss, per weight matrix column.

The damage of replacing weights W by Ŵ is predicted with it (Hessian-free, as in SqueezeLLM
and HAWQ): KL(p_W ‖ p_Ŵ) ≈ ½ Σ F ⊙ (W − Ŵ)², additive over tensors, in nats per token, so
the tied embedding, an attention projection and an MLP matrix are priced in one currency.
F is averaged over each matrix's rows, one value per input column: formats permute rows
(llama.cpp's Llama q/k) but never columns, so the means line up with any format's tensor.
Computed with torch autograd on calibration windows, cached by the caller's key.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgellm.artifacts import atomic_path, sha256_json

FISHER_WINDOWS = 16  # calibration windows the Fisher pass reads (~10 s each for 135M on 2 cores)


def fisher_cache(calibration, work: Path) -> Path:
    """Where the Fisher pass of this calibration text is cached in `work`."""
    key = sha256_json([calibration.text, calibration.seqlen, FISHER_WINDOWS])[:12]
    return Path(work) / f"fisher-{key}.npz"


def fisher_by_parameter(model_dir: Path, calibration, work: Path) -> dict[str, np.ndarray]:
    """{HF parameter name of each matrix: per-token Fisher averaged over rows, per column},
    on the calibration text, cached in `work` (a folder of intermediates of this model).
    A GGUF budget computes it inside the importance matrix's pass (export/imatrix.py)."""
    cache = fisher_cache(calibration, work)
    if cache.is_file():
        with np.load(cache) as stored:
            return {name: stored[name] for name in stored.files}
    import torch

    from edgellm.data import calibration_windows
    from edgellm.models import load_folder_model

    windows = calibration_windows(model_dir, calibration.text, FISHER_WINDOWS,
                                  calibration.seqlen)
    sums = FisherSums(load_folder_model(model_dir))
    for window in windows:
        sums.add(torch.from_numpy(window.astype(np.int64))[None])
    return sums.save(cache)


class FisherSums:
    """Σ over windows of T·(∂ mean loss / ∂W)² per matrix column: `add` runs one window
    forward and backward (the model's matrices take gradients from here on), `save`
    writes the per-token means."""

    def __init__(self, model):
        import torch

        self.model, self.windows = model, 0
        self.params = {name: p for name, p in model.named_parameters() if p.dim() == 2}
        for p in model.parameters():
            p.requires_grad_(p.dim() == 2)
        self.sums = {name: torch.zeros(p.shape[1]) for name, p in self.params.items()}

    def add(self, ids) -> None:
        self.model.zero_grad(set_to_none=True)
        self.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for name, p in self.params.items():
            if p.grad is not None:  # ∇ of the mean over T tokens: T·E[g²] is per token
                self.sums[name] += (p.grad.float() ** 2).sum(dim=0) * (ids.shape[1] - 1)
        self.windows += 1

    def save(self, cache: Path) -> dict[str, np.ndarray]:
        fisher = {name: (total / (self.windows * self.params[name].shape[0])).numpy()
                  .astype(np.float32) for name, total in self.sums.items()}
        with atomic_path(cache) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **fisher)
        return fisher


def float_matrices(model_dir: Path) -> dict[str, np.ndarray]:
    """{HF parameter: float32 array} of every matrix of a float HF folder (bf16 included:
    read through torch)."""
    from safetensors.torch import load_file

    weights = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for name, value in load_file(path).items():
            if value.dim() == 2:
                weights[name] = value.float().numpy()
    return weights
