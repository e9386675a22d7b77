"""How much of a matrix's rounding damage GPTQ leaves, per input column: the price a size
budget puts on each type when GPTQ solves the matrices after the plan.

A budget's damage table prices rounding (½ Σ F ⊙ ΔW², export/fisher.py). GPTQ rounds the
columns one at a time and moves each column's error onto the columns still to come, so
column j's error reaches the layer's output only through what those columns cannot
express: with H the Hessian of the layer's inputs (columns in GPTQ's order), the output
error of a rounding error e_j is e_j²·s_j with s_j = 1/[U]_jj², U the upper Cholesky
factor of H⁻¹ (the Schur complement of the later columns), against e_j²·H_jj for plain
rounding (independent errors; the OBS/GPTQ error formula). The survivor share
t_j = s_j / H_jj ∈ (0, 1] scales column j's Fisher weight, so a matrix GPTQ can repair
costs less in the plan than one it cannot, and the plan gives its bits where they still
count after GPTQ. Rounding only (no GPTQ step), the plan keeps the plain prices. Used by
the ONNX and MLX budgets; a GGUF plan priced this way measured worse (docs/design.md).

Computed on the float model over the Fisher pass's calibration windows, for every linear
GPTQ solves: each decoder layer's, and an untied lm_head (solved on the final norm's
outputs). A tied embedding keeps t = 1: its lookup rows are not GPTQ's. Cached by content
like the Fisher pass; a missing Fisher pass is computed in the same pass (the windows run
forward and backward once instead of forward twice), so a budget asks for this first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgellm.artifacts import atomic_path, sha256_json

PRICE_DAMP = 1e-3  # the Hessian's damping in the price (see survivor_share)


def survivor_share(H, damp: float = PRICE_DAMP) -> np.ndarray:
    """t_j = s_j / H_jj per column, columns solved in GPTQ's act-order (decreasing H_jj),
    H damped by `damp`·mean(diag H) (GPTQ solves with 1%; the price takes less, which
    predicts its measured output error within ~10% where 1% overstated it 1.6×:
    tests/test_gptq_pricing.py); dead columns 1 (their Fisher weight is 0 anyway)."""
    import torch

    H = H.double()
    diagonal = torch.diag(H)
    order = torch.argsort(diagonal, descending=True)
    damped = H[order][:, order] + damp * diagonal.mean() * torch.eye(len(H), dtype=H.dtype)
    damped[diagonal[order] == 0, diagonal[order] == 0] = 1
    factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)),
                                   upper=True)  # GPTQ's: upper factor of H⁻¹
    share = torch.empty(len(H), dtype=torch.float64)
    share[order] = (1 / torch.diag(factor) ** 2 / torch.diag(damped)).clamp(max=1.0)
    share[diagonal == 0] = 1.0
    return share.float().numpy()


def gptq_attenuation(model_dir: Path, calibration, work: Path) -> dict[str, np.ndarray]:
    """{HF parameter of every linear GPTQ solves: survivor share per input column}, cached
    in `work` (the folder of this model's intermediates)."""
    from edgellm.export.fisher import FISHER_WINDOWS

    key = sha256_json([calibration.text, calibration.seqlen, FISHER_WINDOWS, PRICE_DAMP,
                       "act-order"])[:12]
    cache = Path(work) / f"gptq-attenuation-{key}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            return {name: stored[name] for name in stored.files}
    shares = {f"{name}.weight": survivor_share(H)
              for name, H in _input_hessians(model_dir, calibration, work).items()}
    with atomic_path(cache) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **shares)
    return shares


def _input_hessians(model_dir: Path, calibration, work: Path) -> dict:
    """{module name: Σ x xᵀ of its inputs} for the decoder layers' linears and an untied
    lm_head, over the Fisher pass's windows (export/input_sums.py: linears reading one
    tensor compute its product once). The Fisher pass, when `work` lacks it, runs in the
    same forward passes."""
    import torch

    from edgellm.data import calibration_windows
    from edgellm.export.fisher import FISHER_WINDOWS, FisherSums, fisher_cache
    from edgellm.export.input_sums import InputSums
    from edgellm.models import has_tied_head, load_folder_model

    model = load_folder_model(Path(model_dir)).eval()
    tied = has_tied_head(model)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and (name.startswith("model.layers.") or (name == "lm_head" and not tied))}
    cache = fisher_cache(calibration, work)
    fisher = None if cache.is_file() else FisherSums(model)
    hessians = InputSums(linears, input_hessian)
    windows = calibration_windows(model_dir, calibration.text, FISHER_WINDOWS, calibration.seqlen)
    try:
        for window in windows:
            ids = torch.from_numpy(window.astype(np.int64))[None]
            if fisher:
                fisher.add(ids)
            else:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
    finally:
        hessians.close()
    if fisher:
        fisher.save(cache)
    return hessians.sums


def input_hessian(rows):
    rows = rows.double()
    return rows.T @ rows
