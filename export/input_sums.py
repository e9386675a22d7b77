"""Sums of a statistic of linear layers' inputs over calibration windows, computed once per
distinct input tensor (q/k/v read one tensor, gate/up another).

Two calibration passes of the export stage collect such sums: the importance matrix
(export/imatrix.py: per-column squares, float32, what llama.cpp's quantizer weighs) and
GPTQ's price in a size budget (export/gptq_pricing.py: the Hessian x xᵀ, float64). The
compress stage keeps its own (compress/hessians.py): it runs one decoder layer at a time
and stops each pass early, and stages do not import each other.
"""

from __future__ import annotations

from typing import Callable


class InputSums:
    """Forward pre-hooks adding `statistic(rows)` of each named module's input (its last
    dimension the rows' width) to that name's sum while `active`, with the count of rows.
    A tensor read by consecutive modules (q/k/v, gate/up) has its statistic computed once;
    `add` takes an input no hook sees (the decoder's output for the logits' matrix)."""

    def __init__(self, modules: dict, statistic: Callable):
        self.statistic, self.active = statistic, True
        self.sums: dict = {}
        self.rows: dict[str, int] = {}
        self.last: tuple | None = None  # (last input tensor, its statistic, its rows)
        self.handles = [module.register_forward_pre_hook(self._hook(name))
                        for name, module in modules.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            if self.active:
                self.add(name, args[0])
        return hook

    def add(self, name: str, x) -> None:
        if self.last is None or self.last[0] is not x:
            flat = x.detach().reshape(-1, x.shape[-1])
            self.last = (x, self.statistic(flat), flat.shape[0])
        _, value, rows = self.last
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()  # `value` may be added to the next name too
        self.rows[name] = self.rows.get(name, 0) + rows

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.last = None
