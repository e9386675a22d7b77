"""GPTQ's integers in an MLX folder: each solved linear's q, float16 scales and biases.

MLX's affine quantization computes w = q·scale + bias per group of the input dimension,
with q packed into uint32 words (one bit stream, low bits first) and scale and bias in
the model's float16. GPTQ solves onto the NBits grid with zero points (the same
groups, scales already float16), whose w = (q − zero)·scale is MLX's with
bias = −zero·scale; rounding that bias to float16 moves a weight by at most 2⁻¹¹ of
|zero·scale|: 2⁻¹¹·zero steps, under 0.8% of a step at 4 bits, up to 12% at 8 bits (still
2⁻¹¹ of the group's range). mlx-lm's converter writes the folder from the
dequantized checkpoint with the same bits and group size; every linear GPTQ solved then
has its tensors replaced by the checkpoint's. No maintained tool writes GPTQ integers into
an MLX file (mlx-lm's own GPTQ solves and writes in one go, from an MLX model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgellm.errors import UserError


def pack_words(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers [rows, cols] as MLX's uint32 words [rows, cols·bits/32]: one
    little-endian bit stream per row, each integer's low bit first (for 4 and 8 bits,
    32/bits whole integers per word; 3, 5 and 6 bits straddle words)."""
    rows, cols = q.shape
    planes = (q.astype(np.uint32)[..., None] >> np.arange(bits, dtype=np.uint32)) & 1
    stream = np.packbits(planes.astype(np.uint8).reshape(rows, cols * bits), axis=1,
                         bitorder="little")
    return np.ascontiguousarray(stream).view("<u4").astype(np.uint32)


def affine_tensors(q: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                   bits: int) -> dict[str, np.ndarray]:
    """{"weight", "scales", "biases"} as MLX stores integers q with per-group scale and
    integer zero point: w = (q − zero)·scale = q·scale + bias, bias = −zero·scale."""
    if int(q.max()) >= 1 << bits:
        raise UserError(f"GPTQ integers up to {int(q.max())} do not fit MLX's {bits} bits: "
                        "export with the step's bits")
    scale = scale.astype(np.float16)
    bias = (-zero.astype(np.float32) * scale.astype(np.float32)).astype(np.float16)
    return {"weight": pack_words(q, bits), "scales": scale, "biases": bias}


def mlx_tensors(linear, bits: int) -> dict[str, np.ndarray]:
    """{"weight", "scales", "biases"} of one GPTQ linear as MLX stores them at `bits` (a
    checkpoint holds 5- and 6-bit integers in its 8-bit layout)."""
    return affine_tensors(linear.q.numpy(), linear.scale.float().numpy(),
                          linear.zero.float().numpy(), bits)


def module_bits(folder: Path) -> dict:
    """{module: bits} of an mlx-lm folder as its config.json says (a module of its own
    setting, else the folder's), with None as the key for the folder's default."""
    import json

    quant = json.loads((Path(folder) / "config.json").read_text())["quantization"]
    out = {name: setting["bits"] for name, setting in quant.items() if isinstance(setting, dict)}
    return {None: quant.get("bits"), **out}


def replace_in_mlx(folder: Path, modules: dict[str, dict[str, np.ndarray]], what: str) -> set[str]:
    """Put each module's {"weight", "scales", "biases"} in place of what mlx-lm wrote in
    `folder`; the modules replaced. Refused when mlx-lm quantized one otherwise."""
    from safetensors.numpy import load_file, save_file

    from edgellm.artifacts import atomic_path

    replaced = set()
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        for name, parts in modules.items():
            if f"{name}.scales" not in tensors:
                continue
            for part, value in parts.items():
                if tensors[f"{name}.{part}"].shape != value.shape:
                    raise UserError(f"MLX stored {name}.{part} as {tensors[f'{name}.{part}'].shape}, "
                                    f"{what} {value.shape}: export with the step's bits and "
                                    "group size")
                tensors[f"{name}.{part}"] = value
            replaced.add(name)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "mlx"})
    return replaced


def gptq_modules(checkpoint: Path, folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """{module: MLX tensors} of every linear the GPTQ checkpoint solved, at the bits the
    mlx-lm folder `folder` gives that module."""
    from edgellm.export.gguf_gptq import packed_linears

    widths = module_bits(folder)
    return {name: mlx_tensors(linear, widths.get(name, widths[None]))
            for name, linear in packed_linears(checkpoint).items()}


def carry_gptq_into_mlx(checkpoint: Path, folder: Path) -> int:
    """Replace, in the mlx-lm folder `folder`, every linear the GPTQ checkpoint solved by
    its integers; the number replaced."""
    return len(replace_in_mlx(folder, gptq_modules(checkpoint, folder), "GPTQ solved"))
