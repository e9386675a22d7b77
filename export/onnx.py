"""HF folder → ONNX decoder with KV cache, written by the onnxruntime-genai model builder.

Why the builder (see README): it emits the graph ONNX Runtime runs fastest on CPU and
mobile (GroupQueryAttention with a KV cache, MatMulNBits for 4/8-bit weights) plus the
genai_config.json that onnxruntime-genai loads on Android/iOS; its fp32 export scores
the same ids as torch to within 1e-5 relative here. It runs as a child process so its
torch/ONNX memory and its console output stay out of ours (the log is kept beside the
intermediates); the child (run_builder) is the builder's own command line, with the config
it reads restated in the terms it expects (builder_config: Phi-3, Gemma 3).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from edgellm.archs import attention_shape
from edgellm.artifacts import atomic_path
from edgellm.children import run_logged
from edgellm.errors import UserError

# recipe weights → builder precision
PRECISIONS = {"f32": "fp32", "f16": "fp16", "int8": "int8", "int4": "int4"}
# int8-dynamic: the fp32 graph, then MatMulInteger by ONNX Runtime (export/onnx_dynamic.py)
ONNX_WEIGHTS = (*PRECISIONS, "int8-dynamic")
ONNX_NEED = ("the ONNX exporter (onnxruntime-genai builder)", "onnx")  # (what, Family field)


# Full-length KV caches in every layer. The builder's default on CPU (0.18) gives sliding-
# window layers (Gemma 3, Mistral/Phi-3 with sliding_window) a bounded cache the caller must
# preallocate at the window's size; runtimes/ort.py, like the builder's graphs of other
# models, grows each cache by concatenation. The window itself stays in the graph
# (GroupQueryAttention's local_window_size): the scores are the same.
GRAPH_OPTIONS = ("windowed_kv_cache=false",)
# The child process: the builder's own command line, with its config adapted (builder_config)
BUILDER_CHILD = "import sys; from edgellm.export.onnx import run_builder; run_builder(sys.argv[1:])"


def builder_options(export) -> list[str]:
    """--extra_options for the builder: block size, symmetry, accuracy level, and the tied
    embedding/lm_head kept at 8 bits for 4-bit exports (4-bit there costs most quality)."""
    if export.weights not in ("int4", "int8"):
        return []
    # algo_config=rtn: round-to-nearest, and the path where mixed precision for a tied
    # lm_head works (with the default algo the int8 lm_head node lost its weight input)
    options = ["algo_config=rtn", f"block_size={export.block_size}",
               f"accuracy_level={export.accuracy_level}",
               f"is_symmetric={'true' if export.symmetric else 'false'}"]
    if export.weights == "int4" and export.lm_head_bits == 8:
        options.append("matmul_mixed_precision=last_matmul:int8")
    return options


def check_architecture(model_dir: Path, weights: str = "f32") -> None:
    """The folder's family (edgellm/archs/) is one the builder writes, and its rotary size
    one ONNX Runtime runs, or a one-line refusal."""
    from edgellm.archs import check_variant, family_of

    config = json.loads((model_dir / "config.json").read_text())
    check_variant(family_of(config, str(model_dir)), ONNX_NEED, [], str(model_dir))
    if weights != "f16":
        check_rotary(config, str(model_dir))


def check_rotary(config: dict, model: str = "model") -> None:
    """The builder's fp32-activation CPU graphs (f32, int8, int4) rotate q and k inside
    GroupQueryAttention, whose CPU kernel takes a cos/sin cache of rotary_dim / 2 columns
    only when that is a multiple of 8 ("cos_cache dimension 1 must be <= head_size / 2 and
    a multiple of 8"): the export succeeds, every run fails. Real models fit (Phi-4-mini:
    0.75 × 128 = 96); a partial rotary of another size is refused here, in one line."""
    if not config.get("num_attention_heads") or not config.get("hidden_size"):
        return
    head_dim = attention_shape(config).head_dim
    rope = config.get("rope_parameters") or {}
    factor = config.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
    rotary = int(head_dim * factor)
    if (rotary // 2) % 8:
        raise UserError(f"model {model}: rotates {rotary} of its {head_dim} head dimensions; "
                        "ONNX Runtime's GroupQueryAttention (f32/int8/int4 on CPU) needs a "
                        "multiple of 16: export f16, or another format")


def export_onnx(model_dir: Path, target: Path, export, work: Path,
                graph_options: tuple[str, ...] = ()) -> Path:
    """Write the ONNX folder `target` (model.onnx, model.onnx.data, genai_config.json,
    tokenizer files). `target` lies inside a staging folder, so a failure leaves nothing.
    `graph_options`: more builder --extra_options (export/onnx_budget.py unfuses q/k/v)."""
    check_architecture(model_dir, export.weights)
    if export.weights == "int8-dynamic":
        return _export_dynamic_int8(model_dir, target, export, work)
    target.mkdir(parents=True, exist_ok=True)
    log = work / f"onnx-builder-{export.weights}.log"
    cmd = [sys.executable, "-c", BUILDER_CHILD, "-i", str(model_dir),
           "-o", str(target), "-p", PRECISIONS[export.weights], "-e", "cpu",
           "-c", str(work / "onnx-builder-cache"),
           "--extra_options", *GRAPH_OPTIONS, *graph_options, *builder_options(export)]
    if run_logged(cmd, log) != 0:
        last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"ONNX export of {model_dir} failed ({last[0][:200]}): see {log}")
    shutil.rmtree(work / "onnx-builder-cache", ignore_errors=True)
    if export.weights == "f16":
        drop_shape_hints(target / "model.onnx")
    if export.weights == "int8" and _ties_embeddings(model_dir):
        from edgellm.export.onnx_tied import share_tied_int8_embedding

        share_tied_int8_embedding(target / "model.onnx")
    return target


def builder_config(config) -> None:
    """Restate, on the transformers config the builder reads, what onnxruntime-genai 0.18
    expects in transformers 4's terms (the weights it loads separately are untouched).

    Phi-3: the builder picks its LongRoPE graph whenever max_position_embeddings differs
    from original_max_position_embeddings, and that graph needs LongRoPE's factors
    (`KeyError: 'multi_cache'` without them). transformers' Phi3Config defaults the
    original length to 4096, so a model without LongRoPE and another context length (a
    Phi-4-mini-like model with default rope, or any model whose max was changed) was sent
    there. Without LongRoPE the original length means nothing: it is set to the max. With
    LongRoPE (Phi-4-mini) the graph reads the scaling type under its older key, `type`.

    Gemma 3: transformers 5 keeps one rope setting per layer type (`rope_parameters` =
    {"full_attention": {...}, "sliding_attention": {...}}) and drops the top-level
    `rope_theta` and `rope_local_base_freq`; the builder reads `rope_parameters["rope_type"]`
    (`KeyError: 'rope_type'`), the global theta as `rope_theta` and the local one as
    `rope_local_base_freq`. A copy of config.json cannot restate them: transformers 5 nests
    them again on load. The global layers' setting becomes the flat one."""
    from edgellm.archs import rope_types

    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict):
        return
    names = getattr(config, "architectures", None) or []
    if "Phi3ForCausalLM" in names and "longrope" not in rope_types(config.to_dict()):
        config.original_max_position_embeddings = config.max_position_embeddings
    if "rope_type" in rope:  # LongRoPE's graph reads the older key (`KeyError: 'type'`)
        rope.setdefault("type", rope["rope_type"])
    if isinstance(rope.get("full_attention"), dict):
        local = rope.get("sliding_attention") or rope["full_attention"]
        config.rope_theta = rope["full_attention"].get("rope_theta", 10000.0)
        config.rope_local_base_freq = local.get("rope_theta", config.rope_theta)
        config.rope_parameters = dict(rope["full_attention"])


def run_builder(argv: list[str]) -> None:
    """The builder's command line (`python -m onnxruntime_genai.models.builder ARGV`), run in
    this (child) process with builder_config applied to the config it loads."""
    from onnxruntime_genai.models import builder

    if not hasattr(builder, "get_hf_details"):  # another builder version: adapt builder_config
        raise SystemExit("onnxruntime_genai.models.builder has no get_hf_details: this "
                         "onnxruntime-genai version is not the one edgellm was tested with")
    load = builder.get_hf_details

    def adapted(*args, **kwargs):
        details = load(*args, **kwargs)
        builder_config(details["hf_config"])
        return details

    builder.get_hf_details = adapted
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    args = builder.get_args()
    extra_options = builder.parse_extra_options(
        args.model_name, args.input, args.output, args.precision, args.execution_provider,
        args.cache_dir, args.extra_options, builder_config_version=args.builder_config_version,
        target_options=args.target_options, drafter_options=args.drafter_options,
        speculative_options=args.speculative_options, runtime_config=args.runtime_config,
        search=args.search)
    builder.create_model(args.model_name, args.input, args.output, args.precision,
                         args.execution_provider, args.cache_dir, **extra_options)


def _export_dynamic_int8(model_dir: Path, target: Path, export, work: Path) -> Path:
    from edgellm.export.onnx_dynamic import quantize_dynamic_int8

    fp32 = work / "onnx-f32-for-int8-dynamic"
    shutil.rmtree(fp32, ignore_errors=True)
    export_onnx(model_dir, fp32, export.model_copy(update={"weights": "f32"}), work)
    explicit = "lm_head_bits" in export.model_fields_set and export.lm_head_bits == 8
    quantize_dynamic_int8(fp32, target, quantize_lm_head=explicit)
    copy_side_files(fp32, target)
    shutil.rmtree(fp32, ignore_errors=True)
    return target


def drop_shape_hints(model_path: Path) -> None:
    """Remove the graph's value_info (optional shape annotations of intermediate tensors).

    The builder's fp16 CPU graph (onnxruntime-genai 0.18) repeats K/V heads with Reshape
    nodes whose outputs it annotates with the new tokens' length, `sequence_length`, where
    the cache makes them `total_sequence_length` long. ONNX Runtime plans its buffers from
    those hints: the prefill runs, and the first cached decode step fails with "Shape
    mismatch attempting to re-use buffer". Without the hints ONNX Runtime infers the shapes
    itself; the weights (external data) are untouched."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    del model.graph.value_info[:]
    with atomic_path(model_path) as tmp:
        onnx.save(model, str(tmp))


def _ties_embeddings(model_dir: Path) -> bool:
    import json

    return bool(json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings"))


def convert_to_ort(onnx_dir: Path, target: Path, work: Path) -> Path:
    """ORT format for ONNX Runtime Mobile, by onnxruntime's own converter."""
    target.mkdir(parents=True, exist_ok=True)
    log = work / "ort-convert.log"
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort",
           str(onnx_dir / "model.onnx"), "--output_dir", str(target),
           "--optimization_style", "Fixed"]
    if run_logged(cmd, log) != 0 or not (target / "model.ort").is_file():
        raise UserError(f"ORT-format conversion of {onnx_dir} failed: see {log}")
    copy_side_files(onnx_dir, target)
    _point_genai_config_at(target / "genai_config.json", "model.ort")
    return target


def copy_side_files(onnx_dir: Path, target: Path) -> None:
    """The tokenizer files and genai_config.json that travel with an ONNX model."""
    for extra in onnx_dir.iterdir():
        if extra.suffix in (".json", ".jinja"):
            shutil.copy2(extra, target / extra.name)


def _point_genai_config_at(config_path: Path, filename: str) -> None:
    """onnxruntime-genai opens the file genai_config.json names: in an ORT folder, the
    .ort model (the builder wrote model.onnx, which the folder does not hold)."""
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["filename"] = filename
    config_path.write_text(json.dumps(config, indent=4) + "\n")

