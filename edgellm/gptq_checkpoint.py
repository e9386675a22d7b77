"""The standard GPTQ checkpoint format: read and write `qweight`, `qzeros`, `scales`, `g_idx`.

The layout is the one auto-gptq defined and GPTQModel, transformers/optimum and the
onnxruntime-genai builder read (`checkpoint_format: "gptq"`):
  qweight  int32 [in / (32/bits), out]    q packed along the input dimension, low bits first
  qzeros   int32 [groups, out / (32/bits)] zero points minus one (the format's historical
                                           offset; a zero of 0 wraps to 2^bits - 1), packed
  scales   float16 [groups, out]
  g_idx    int32 [in]                      the group of each input column
and w[o, i] = scales[g, o] · (q[i, o] − zero[g, o]) with g = g_idx[i].
Written by hand: GPTQModel would pull its own torch pin just to pack integers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgellm.errors import UserError
from edgellm.grids import NBits, dequantize

PARTS = ("qweight", "qzeros", "scales", "g_idx")
# beside a checkpoint solved under a GGUF budget: the importance matrix the plan was priced
# with (the float model's), which llama.cpp's quantizer then uses for the tensors left to it
PLAN_IMATRIX = "edgellm_imatrix.npz"


@dataclass
class PackedLinear:
    """One quantized linear layer: q [out, in] integers, scale/zero [out, groups]."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group: int

    def dequantize(self) -> torch.Tensor:
        """(q − zero)·scale in float32, what GGUF and MatMulNBits compute."""
        return dequantize(NBits(self.bits, self.group, False), self.q, self.scale, self.zero)


def pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned `bits`-bit integers [n, m] into int32 [n·bits/32, m], low bits first."""
    per = 32 // bits
    values = values.astype(np.uint32).reshape(-1, per, values.shape[1])
    packed = np.zeros((values.shape[0], values.shape[2]), dtype=np.uint32)
    for k in range(per):
        packed |= values[:, k] << np.uint32(bits * k)
    return packed.view(np.int32)


def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    per = 32 // bits
    packed = packed.view(np.uint32)
    mask = np.uint32((1 << bits) - 1)
    parts = [(packed >> np.uint32(bits * k)) & mask for k in range(per)]
    return np.stack(parts, axis=1).reshape(-1, packed.shape[1]).astype(np.int64)


def to_checkpoint(linear: PackedLinear) -> dict[str, torch.Tensor]:
    """The four checkpoint tensors of one layer (names relative to the layer)."""
    bits, mask = linear.bits, (1 << linear.bits) - 1
    q = linear.q.to(torch.int64).T.numpy()  # [in, out]
    zeros = ((linear.zero.to(torch.int64) - 1) & mask).T.numpy()  # [groups, out]
    cols = q.shape[0]
    return {
        "qweight": torch.from_numpy(pack_rows(q, bits)),
        "qzeros": torch.from_numpy(np.ascontiguousarray(pack_rows(zeros.T, bits).T)),
        "scales": linear.scale.T.to(torch.float16).contiguous(),
        "g_idx": torch.arange(cols, dtype=torch.int32) // linear.group,
    }


def from_checkpoint(parts: dict[str, torch.Tensor], bits: int, group: int, where: str) -> PackedLinear:
    """One layer from its checkpoint tensors; refuses a g_idx that is not contiguous groups
    (act-order checkpoints without static groups) since no export grid can hold it."""
    mask = (1 << bits) - 1
    q = unpack_rows(parts["qweight"].numpy(), bits)  # [in, out]
    zeros = unpack_rows(np.ascontiguousarray(parts["qzeros"].numpy().T), bits).T  # [groups, out]
    cols = q.shape[0]
    g_idx = parts["g_idx"].to(torch.int64) if "g_idx" in parts else None
    if g_idx is not None and not torch.equal(g_idx, torch.arange(cols) // group):
        raise UserError(f"GPTQ tensor {where}.g_idx reorders input columns (act-order without "
                        "static groups): export needs contiguous groups; requantize with static groups")
    zero = (torch.from_numpy(zeros) + 1) & mask
    return PackedLinear(torch.from_numpy(q).T.contiguous(), parts["scales"].float().T.contiguous(),
                        zero.T.contiguous().float(), bits, group)


def gptq_config(config: dict) -> dict | None:
    """The quantization_config of a GPTQ checkpoint's config.json, or None."""
    quant = config.get("quantization_config") or {}
    return quant if quant.get("quant_method") == "gptq" else None


def is_gptq_folder(folder: Path) -> bool:
    path = Path(folder) / "config.json"
    return path.is_file() and gptq_config(json.loads(path.read_text())) is not None


def write_plan_imatrix(dest: Path, matrix: dict[str, np.ndarray]) -> None:
    np.savez(Path(dest) / PLAN_IMATRIX, **matrix)


def read_plan_imatrix(folder: Path) -> dict[str, np.ndarray] | None:
    """The importance matrix a budget checkpoint carries, None where it carries none."""
    path = Path(folder) / PLAN_IMATRIX
    if not path.is_file():
        return None
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


def read_packed(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, PackedLinear]:
    """{linear name: PackedLinear} from a checkpoint's tensors (all of them, by name)."""
    config = gptq_config(json.loads((Path(folder) / "config.json").read_text()))
    if config.get("checkpoint_format", "gptq") != "gptq":
        raise UserError(f"GPTQ checkpoint {folder} has checkpoint_format "
                        f"'{config['checkpoint_format']}': edgellm reads 'gptq' (v1) checkpoints")
    prefixes = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".qweight")}
    layers = {}
    for prefix in sorted(prefixes):
        missing = [p for p in ("qweight", "qzeros", "scales") if f"{prefix}.{p}" not in tensors]
        if missing:
            raise UserError(f"GPTQ checkpoint {folder} lacks {prefix}.{missing[0]}: the folder is "
                            "incomplete; download or write it again")
        parts = {p: tensors[f"{prefix}.{p}"] for p in PARTS if f"{prefix}.{p}" in tensors}
        bits, group = module_settings(config, prefix)
        layers[prefix] = from_checkpoint(parts, bits, group, prefix)
    return layers


def module_settings(config: dict, module: str) -> tuple[int, int]:
    """(bits, group size) of one linear: the checkpoint's, or a GPTQModel `dynamic`
    override whose pattern matches the module's name ("+:" or no prefix: these settings;
    "-:" marks a module left unquantized, which has no qweight)."""
    bits, group = int(config["bits"]), int(config["group_size"])
    for pattern, settings in (config.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            continue
        if re.match(pattern.removeprefix("+:"), module):
            return int(settings.get("bits", bits)), int(settings.get("group_size", group))
    return bits, group


def dynamic_overrides(settings: dict[str, tuple[int, int, bool] | None],
                      base: tuple[int, int, bool]) -> dict[str, dict]:
    """GPTQModel `dynamic` entries for modules whose (bits, group, sym) differ from the
    checkpoint's `base`, and "-:" for modules left in float (None), by exact name."""
    dynamic = {}
    for module, setting in sorted(settings.items()):
        pattern = f"^{re.escape(module)}$"
        if setting is None:
            dynamic[f"-:{pattern}"] = {}
        elif setting != base:
            bits, group, sym = setting
            dynamic[f"+:{pattern}"] = {"bits": bits, "group_size": group, "sym": sym}
    return dynamic


def dequantized_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GPTQ checkpoint folder as float weights, under the plain names a
    transformers model expects (`…q_proj.weight` instead of its four parts)."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    state = {}
    for prefix, linear in read_packed(folder, tensors).items():
        state[f"{prefix}.weight"] = linear.dequantize()
    quantized = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".qweight")}
    for name, tensor in tensors.items():
        prefix, _, part = name.rpartition(".")
        if prefix not in quantized or part == "bias":  # a quantized linear keeps its bias (Qwen2)
            state[name] = tensor.float() if tensor.is_floating_point() else tensor
    return state


def load_dequantized(folder: Path, dtype=torch.float32):
    """A transformers model from a GPTQ checkpoint folder, weights dequantized: the torch
    reference of what the exports compute (no GPTQ kernels needed)."""
    from edgellm.empty_model import assign_state, empty_model, plain_config

    config = plain_config(folder)
    model = empty_model(config, dtype)
    assign_state(model, dequantized_state(folder),
                 f"GPTQ checkpoint {folder} does not match its config ({{name}}): "
                 "the folder is incomplete or from another model")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype).eval()
