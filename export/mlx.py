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
BITS = {"q8": 8, "q4": 4}
DEFAULT_GROUP_SIZE = 64  # mlx-lm's default


def export_mlx(model_dir: Path, target: Path, weights: str, work: Path,
               group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    """Write the mlx-lm folder `target` from the HF folder `model_dir`."""
    try:
        from mlx_lm import convert
    except ImportError:
        raise UserError("MLX export needs mlx-lm: pip install 'edgellm[mlx]' (mlx[cpu] on "
                        "Linux, mlx on macOS)") from None
    if weights not in MLX_WEIGHTS:
        raise UserError(f"MLX weights '{weights}' unknown: use one of {', '.join(MLX_WEIGHTS)}")
    log = io.StringIO()  # mlx-lm prints its progress; keep it for the work log
    kwargs = {"dtype": "float16"}
    if weights in BITS:
        kwargs.update(quantize=True, q_bits=BITS[weights], q_group_size=group_size)
    with contextlib.redirect_stdout(log):
        convert(str(model_dir), str(target), **kwargs)
    (work / f"mlx-{weights}.log").write_text(log.getvalue())
    (target / "README.md").unlink(missing_ok=True)  # mlx-lm's hub model card template
    _record(target, weights, group_size)
    return target


def _record(target: Path, weights: str, group_size: int) -> None:
    """Note in config.json what edgellm asked for, beside mlx-lm's own `quantization`, and
    restate the rope settings the way mlx-lm reads them."""
    path = target / "config.json"
    config = json.loads(path.read_text())
    _legacy_rope_keys(config)
    config["edgellm_export"] = {"format": "mlx", "weights": weights,
                                "group_size": group_size if weights in BITS else None}
    path.write_text(json.dumps(config, indent=2) + "\n")


def _legacy_rope_keys(config: dict) -> None:
    """transformers 5 writes rope settings as `rope_parameters`; mlx-lm 0.32 reads only the
    older top-level `rope_theta` and `rope_scaling`, and silently uses theta 10,000
    without them (SmolLM2's is 100,000: +11.7% perplexity, caught by the e2e test)."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", scaling)
