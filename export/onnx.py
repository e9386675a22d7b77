"""HF folder → ONNX decoder with KV cache, written by the onnxruntime-genai model builder.

Why the builder (see README): it emits the graph ONNX Runtime runs fastest on CPU and
mobile (GroupQueryAttention with a KV cache, MatMulNBits for 4/8-bit weights) plus the
genai_config.json that onnxruntime-genai loads on Android/iOS; its fp32 export scores
the same ids as torch to within 1e-5 relative here. It runs as a child process so its
torch/ONNX memory and its console output stay out of ours (the log is kept beside the
intermediates).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from edgellm.artifacts import atomic_path
from edgellm.errors import UserError

# recipe weights → builder precision
PRECISIONS = {"f32": "fp32", "f16": "fp16", "int8": "int8", "int4": "int4"}
# int8-dynamic: the fp32 graph, then MatMulInteger by ONNX Runtime (export/onnx_dynamic.py)
ONNX_WEIGHTS = (*PRECISIONS, "int8-dynamic")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM")


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


def check_architecture(model_dir: Path) -> None:
    import json

    names = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
    if not any(name in SUPPORTED_ARCHITECTURES for name in names):
        raise UserError(f"architecture {names} has no ONNX exporter: supported are "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def export_onnx(model_dir: Path, target: Path, export, work: Path) -> Path:
    """Write the ONNX folder `target` (model.onnx, model.onnx.data, genai_config.json,
    tokenizer files). `target` lies inside a staging folder, so a failure leaves nothing."""
    check_architecture(model_dir)
    if export.weights == "int8-dynamic":
        return _export_dynamic_int8(model_dir, target, export, work)
    target.mkdir(parents=True, exist_ok=True)
    log = work / f"onnx-builder-{export.weights}.log"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir),
           "-o", str(target), "-p", PRECISIONS[export.weights], "-e", "cpu",
           "-c", str(work / "onnx-builder-cache")]
    options = builder_options(export)
    if options:
        cmd += ["--extra_options", *options]
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"ONNX export of {model_dir} failed ({last[0][:200]}): see {log}")
    shutil.rmtree(work / "onnx-builder-cache", ignore_errors=True)
    if export.weights == "f16":
        drop_shape_hints(target / "model.onnx")
    if export.weights == "int8" and _ties_embeddings(model_dir):
        from edgellm.export.onnx_tied import share_tied_int8_embedding

        share_tied_int8_embedding(target / "model.onnx")
    return target


def _export_dynamic_int8(model_dir: Path, target: Path, export, work: Path) -> Path:
    from edgellm.export.onnx_dynamic import quantize_dynamic_int8

    fp32 = work / "onnx-f32-for-int8-dynamic"
    shutil.rmtree(fp32, ignore_errors=True)
    export_onnx(model_dir, fp32, export.model_copy(update={"weights": "f32"}), work)
    explicit = "lm_head_bits" in export.model_fields_set and export.lm_head_bits == 8
    quantize_dynamic_int8(fp32, target, quantize_lm_head=explicit)
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
    with open(log, "w") as handle:
        proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not (target / "model.ort").is_file():
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

