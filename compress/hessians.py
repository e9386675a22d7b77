"""Which inputs each linear layer of a decoder layer sees: one Hessian per distinct input.

GPTQ, SparseGPT and Wanda all need, per linear layer, the statistics of its inputs on the
calibration activations: the Hessian H = 2/n Σ x xᵀ (Wanda only its diagonal, ‖x_j‖²).
Layers fed the same tensor (q/k/v, gate/up) share one Hessian, and one solve.
"""

from __future__ import annotations

import torch

from edgellm.compress.solver import DiagonalHessian, Hessian


def linear_layers(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


class _Enough(Exception):
    """Raised by a hook once every wanted input has been seen: the rest of the forward
    pass would only cost time."""


@torch.no_grad()
def collect_hessians(layer: torch.nn.Module, inputs, only: list[str] | None = None,
                     first_group: bool = False, diagonal: bool = False) -> dict[str, Hessian]:
    """Run the layer over the calibration activations once; one Hessian per distinct input
    (q/k/v share the normed hidden states, gate/up share theirs). `only` limits which
    linears are measured; with `first_group`, only the first of them to run and those
    sharing its input, and each forward pass stops when a linear with another input comes.
    Either way a pass stops once every measured linear has its input (down_proj's own
    product, a quarter of the layer's work, would be thrown away). `diagonal`: only each
    Hessian's diagonal is accumulated (Wanda)."""
    kind = DiagonalHessian if diagonal else Hessian
    linears = {n: m for n, m in linear_layers(layer).items() if only is None or n in only}
    hessians: dict[str, Hessian] = {}
    # id of an input tensor within one forward call → (the tensor, kept alive so its id is
    # not reused by another tensor in the same call, and its Hessian)
    seen: dict[int, tuple[torch.Tensor, Hessian]] = {}
    measured: set[str] = set()  # the linears whose input this forward call has given

    def reset(*_):
        seen.clear()
        measured.clear()

    def hook_for(name):
        def hook(_module, args):
            x = args[0]
            if first_group and seen and id(x) not in seen:
                raise _Enough
            if id(x) not in seen:
                seen[id(x)] = (x, hessians.get(name) or kind(x.shape[-1]))
                seen[id(x)][1].add(x)
            hessians[name] = seen[id(x)][1]
            measured.add(name)
            if len(measured) == len(linears):
                raise _Enough
        return hook

    handles = [layer.register_forward_pre_hook(reset)]
    handles += [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        inputs.feed(layer, stop=(_Enough,))
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def sequential_groups(layer: torch.nn.Module, inputs, diagonal: bool = False):
    """Yield (names, Hessian) for each group of linears sharing an input, in forward
    order, each measured after the caller changed the groups before it: q/k/v on the
    layer's input, o_proj on what the changed q/k/v attend, and so on ("true sequential"
    in the GPTQ reference code). Costs a partial forward pass per group."""
    remaining = list(linear_layers(layer))
    while remaining:
        hessians = collect_hessians(layer, inputs, only=remaining, first_group=True,
                                    diagonal=diagonal)
        group = list(hessians)
        yield group, hessians[group[0]]
        remaining = [n for n in remaining if n not in group]


def sharing_groups(hessians: dict[str, Hessian]) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, hessian in hessians.items():
        groups.setdefault(id(hessian), []).append(name)
    return list(groups.values())
