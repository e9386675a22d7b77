"""MLX export for Apple silicon: an mlx-lm folder (safetensors + config.json + tokenizer),
in float16 or MLX's affine group quantization (4 or 8 bits, groups of 64 by default).

mlx-lm's own converter writes it (`mlx_lm.convert`), so the folder is exactly what
`mlx_lm.load`, `mlx_lm.generate` and LM Studio's MLX engine read. It runs here on Linux
with `mlx[cpu]` (the `mlx` extra), which is how the tests check its perplexity; on a Mac
the same folder runs on the GPU through Metal.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from edgellm.errors import UserError

MLX_WEIGHTS = ("f16", "q8", "q4")
MLX_NEED = ("the MLX exporter (mlx-lm)", "mlx")  # (what, Family field)


def export_mlx(model_dir: Path, target: Path, weights: str, work: Path,
               group_size: int | None = None) -> Path:
    """Write the mlx-lm folder `target` from the HF folder `model_dir` (a GPTQ checkpoint
    solved on this grid: its integers, export/mlx_gptq.py); quantized types in groups of
    `group_size` (mlx-lm's default, 64, when None)."""
    try:
        from mlx_lm import convert
    except ImportError:
        raise UserError("MLX export needs mlx-lm: pip install 'edgellm[mlx]' (mlx[cpu] on "
                        "Linux, mlx on macOS)") from None
    if weights not in MLX_WEIGHTS:
        raise UserError(f"MLX weights '{weights}' unknown: use one of {', '.join(MLX_WEIGHTS)}")
    from edgellm.gptq_checkpoint import is_gptq_folder
    from edgellm.grids import MLX_BITS, MLX_GROUP  # torch: imported only when exporting
    from edgellm.models import is_packed_folder

    source = json.loads((Path(model_dir) / "config.json").read_text())
    check_mlx_support(source, str(model_dir))
    float_dir = model_dir
    if is_packed_folder(model_dir):
        from edgellm.export.gguf_float import dequantized_folder

        float_dir = dequantized_folder(model_dir, work)
    log = io.StringIO()  # mlx-lm prints its progress; keep it for the work log
    kwargs = {"dtype": "float16"}
    if weights in MLX_BITS:
        group_size = group_size or MLX_GROUP
        kwargs.update(quantize=True, q_bits=MLX_BITS[weights], q_group_size=group_size)
    else:
        group_size = None
    with contextlib.redirect_stdout(log):
        convert(str(float_dir), str(target), **kwargs)
    (work / f"mlx-{weights}.log").write_text(log.getvalue())
    (target / "README.md").unlink(missing_ok=True)  # mlx-lm's hub model card template
    if weights in MLX_BITS and is_gptq_folder(model_dir):
        from edgellm.export.mlx_gptq import carry_gptq_into_mlx

        carry_gptq_into_mlx(model_dir, target)
    record_export(target, weights, group_size)
    return target


def check_mlx_support(config: dict, model: str = "model") -> None:
    """The family (edgellm/archs/) is one mlx-lm loads, and its layout is one mlx-lm's
    model can express; a one-line refusal otherwise."""
    from edgellm.archs import check_variant, family_of

    family = family_of(config, model)
    check_variant(family, MLX_NEED, [], model)
    if family.name == "gemma3":
        _sliding_window_pattern(config, model)


def _sliding_window_pattern(config: dict, model: str = "model") -> int | None:
    """mlx-lm's gemma3_text does not read `layer_types`: it makes layer i global when
    i % sliding_window_pattern == pattern - 1 (default 6, Gemma 3's own). A model with
    another layout (a tiny one, a depth-pruned one) ran with its global layers in the wrong
    places, or failed with an IndexError (under 6 layers): the pattern is derived from
    layer_types, or the model refused when its layer_types follow no such pattern."""
    kinds = config.get("layer_types")
    if not kinds:
        return None
    is_global = [kind == "full_attention" for kind in kinds]
    if True in is_global:
        every = is_global.index(True) + 1
        if is_global == [i % every == every - 1 for i in range(len(kinds))]:
            return every
    raise UserError(f"model {model}: mlx-lm's Gemma 3 runs one global layer every N layers; "
                    f"this model's layer_types ({', '.join(kinds)}) follow no such pattern")


def record_export(target: Path, weights: str, group_size: int | None) -> None:
    """Note in config.json what edgellm asked for (`group_size` None: float or mixed),
    beside mlx-lm's own `quantization`, and restate the rope settings and the layer layout
    the way mlx-lm reads them."""
    path = target / "config.json"
    config = json.loads(path.read_text())
    _legacy_rope_keys(config)
    if config.get("model_type") == "gemma3_text" and config.get("layer_types"):
        config["sliding_window_pattern"] = _sliding_window_pattern(config, str(target))
    config["edgellm_export"] = {"format": "mlx", "weights": weights,
                                "group_size": group_size}
    path.write_text(json.dumps(config, indent=2) + "\n")


def _legacy_rope_keys(config: dict) -> None:
    """transformers 5 writes rope settings as `rope_parameters`; mlx-lm 0.32 reads only the
    older top-level `rope_theta` and `rope_scaling`, and silently uses theta 10,000
    without them (SmolLM2's is 100,000: +11.7% perplexity, caught by the e2e test).
    Gemma 3's settings are per layer type: the global layers' become rope_theta and
    rope_scaling (linear ×8 on Gemma 3 4B and up), the sliding layers' theta
    rope_local_base_freq."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    if isinstance(rope.get("full_attention"), dict):  # Gemma 3: one setting per layer type
        local = rope.get("sliding_attention") or {}
        if "rope_theta" in local:  # mlx-lm: rope_local_base_freq for the sliding layers
            config.setdefault("rope_local_base_freq", local["rope_theta"])
        rope = rope["full_attention"]  # the global layers: rope_theta and rope_scaling
    for key in ("rope_theta", "partial_rotary_factor"):  # the latter: Phi-4-mini
        if key in rope:
            config.setdefault(key, rope[key])
    scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") != "default":
        # phi3 (LongRoPE) reads the scaling type only under its older key, `type`
        config.setdefault("rope_scaling", {"type": scaling["rope_type"], **scaling})
