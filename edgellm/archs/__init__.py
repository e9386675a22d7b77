"""Architecture families: one description per family, read by every stage.

A family file (llama.py, qwen2.py, ...) declares one `Family`: the Hugging Face classes it
covers, the llama.cpp architecture its GGUF carries, the rope scaling types its exporters
handle, which norm or linear feeds which linears (SmoothQuant's migrations), the config
lists indexed by layer (depth pruning slices them), and what the ONNX builder, mlx-lm and
width pruning support. Compression and export ask `family_of(config)` instead of naming
modules themselves; an unknown architecture is refused there, in one line.

Adding a family: a new file here defining `FAMILY`, plus its module name in FAMILY_MODULES.
See docs/design.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.errors import UserError
from edgellm.registry import load_entries

# one line per family: module under edgellm.archs
FAMILY_MODULES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "smollm3")
EXTEND = "edgellm/archs/ (a new family file plus a line in edgellm/archs/__init__.py)"


@dataclass(frozen=True)
class Smooth:
    """One SmoothQuant migration inside a decoder layer: the producer's output channels are
    divided by a per-channel scale, the consumers' input columns multiplied by it.
    `heads`: the producer is v_proj feeding o_proj (one v channel per query head of its
    KV group)."""

    producer: str  # module path inside the layer: a norm or a linear
    consumers: tuple[str, ...]
    heads: bool = False


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # Hugging Face `architectures` class names
    gguf_arch: str  # llama.cpp architecture (general.architecture) of its GGUF
    smooth: tuple[Smooth, ...]
    rope_types: tuple[str, ...] = ("default",)  # rope_type values the exporters handle
    norm_offset: float = 0.0  # norms that compute x̂·(offset + w) (Gemma: 1)
    layer_lists: tuple[str, ...] = ("layer_types",)  # config lists with one entry per layer
    onnx: bool = True  # the onnxruntime-genai builder writes it
    mlx: bool = True  # mlx-lm loads it
    width: bool = True  # separate q/k/v and gate/up projections: width pruning can slice them
    # GGUF fields llama.cpp reads that its converter does not write: config → {key: field}
    gguf_extra: Callable[[dict], dict] | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AttentionShape:
    """A config's attention heads: query heads, KV heads (groups) and each head's width."""

    heads: int
    kv_heads: int
    head_dim: int

    @property
    def per_group(self) -> int:
        """Query heads sharing one KV head."""
        return self.heads // self.kv_heads

    @property
    def width(self) -> int:
        """o_proj's inputs: heads × head_dim (not always hidden_size: Qwen3, Gemma 3)."""
        return self.heads * self.head_dim


def attention_shape(config: dict) -> AttentionShape:
    """The attention shape of a config.json's fields (head_dim explicit or hidden/heads,
    KV heads defaulting to the query heads)."""
    heads = config["num_attention_heads"]
    return AttentionShape(heads, config.get("num_key_value_heads") or heads,
                          config.get("head_dim") or config["hidden_size"] // heads)


LLAMA_SMOOTH = (
    Smooth("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Smooth("self_attn.v_proj", ("self_attn.o_proj",), heads=True),
    Smooth("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Smooth("mlp.up_proj", ("mlp.down_proj",)),
)


def families() -> dict[str, Family]:
    """Every known family by name, in FAMILY_MODULES order."""
    return load_entries("edgellm.archs", FAMILY_MODULES, "FAMILY")


def supported_architectures() -> list[str]:
    return [a for family in families().values() for a in family.architectures]


def family_of(config: dict, model: str = "model") -> Family:
    """The family of an HF config (a dict of config.json), or a one-line refusal naming
    the supported list and where to extend it."""
    names = config.get("architectures") or []
    for family in families().values():
        if any(name in family.architectures for name in names):
            return family
    shown = names or config.get("model_type") or "with no architectures entry"
    raise UserError(f"model {model}: architecture {shown} is not supported (supported: "
                    f"{', '.join(supported_architectures())}): add it in {EXTEND}")


def family_of_folder(folder: Path) -> Family:
    return family_of(json.loads((Path(folder) / "config.json").read_text()), str(folder))


def rope_types(config: dict) -> set[str]:
    """Every rope_type a config uses: transformers 5's `rope_parameters` (per layer type
    for Gemma 3), or the older `rope_scaling`."""
    rope = config.get("rope_parameters") or {}
    parts = [v for v in rope.values() if isinstance(v, dict)] or [rope]
    scaling = config.get("rope_scaling") or {}
    if scaling:
        parts.append(scaling)
    return {part.get("rope_type") or part.get("type") or "default" for part in parts}


def check_rope(config: dict, model: str = "model") -> None:
    """Refuse a rope scaling type the family's exporters do not handle."""
    family = family_of(config, model)
    unknown = rope_types(config) - set(family.rope_types)
    if unknown:
        raise UserError(f"model {model}: rope type {', '.join(sorted(unknown))} is not handled for "
                        f"{family.name} (handled: {', '.join(family.rope_types)}): add it to "
                        f"edgellm/archs/{family.name}.py once its exporters are tested with it")


def check_support(family: Family, what: str, supported: bool, model: str = "model") -> None:
    if not supported:
        raise UserError(f"model {model} ({family.name}): {what} does not support this "
                        f"architecture: see edgellm/archs/{family.name}.py")


def family_of_gguf(arch: str, model: str = "model") -> Family:
    """The family a GGUF's general.architecture belongs to (Mistral's GGUFs say "llama")."""
    for family in families().values():
        if family.gguf_arch == arch:
            return family
    known = ", ".join(sorted({f.gguf_arch for f in families().values()}))
    raise UserError(f"model {model}: GGUF architecture '{arch}' is not supported (supported: "
                    f"{known}): add it in {EXTEND}")


# what a variant's steps need of its family: method → (what, Family field); what an export
# format needs is its registry entry's `family_need` (export/formats/)
STEP_NEEDS = {"width": ("width pruning", "width"), "smoothquant": ("smoothquant", "smooth")}


def check_variant(family: Family, format_need: tuple[str, str] | None, methods: list[str],
                  model: str = "model") -> None:
    """Refuse, before any work, a variant whose export (`format_need`: what it is and the
    Family field it needs) or steps cannot handle the family."""
    for what, attr in [format_need] if format_need else []:
        check_support(family, what, bool(getattr(family, attr)), model)
    for method in methods:
        if method in STEP_NEEDS:
            what, attr = STEP_NEEDS[method]
            check_support(family, what, bool(getattr(family, attr)), model)
