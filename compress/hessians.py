"""Which inputs each linear layer of a decoder layer sees: one Hessian per distinct input.

GPTQ, SparseGPT and Wanda all need, per linear layer, the statistics of its inputs on the
calibration activations: the Hessian H = 2/n Σ x xᵀ (Wanda only its diagonal, ‖x_j‖²).
Layers fed the same tensor (q/k/v, gate/up) share one Hessian, and one solve.
"""

from __future__ import annotations

import torch

from edgellm.compress.solver import Hessian


def linear_layers(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def collect_hessians(layer: torch.nn.Module, inputs) -> dict[str, Hessian]:
    """Run the layer over the calibration activations once; one Hessian per distinct input
    (q/k/v share the normed hidden states, gate/up share theirs)."""
    linears = linear_layers(layer)
    hessians: dict[str, Hessian] = {}
    # id of an input tensor within one forward call → (the tensor, kept alive so its id is
    # not reused by another tensor in the same call, and its Hessian)
    seen: dict[int, tuple[torch.Tensor, Hessian]] = {}

    def reset(*_):
        seen.clear()

    def hook_for(name):
        def hook(_module, args):
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = (x, hessians.get(name) or Hessian(x.shape[-1]))
                seen[id(x)][1].add(x)
            hessians[name] = seen[id(x)][1]
        return hook

    handles = [layer.register_forward_pre_hook(reset)]
    handles += [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        inputs.run(layer)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def sharing_groups(hessians: dict[str, Hessian]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, hessian in hessians.items():
        groups.setdefault(id(hessian), []).append(name)
    return list(groups.values())
