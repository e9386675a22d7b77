"""`edgellm eval` and `edgellm export`: one artifact at a time, outside a recipe."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.console import Console

from edgellm.artifact_stats import artifact_size
from edgellm.artifacts import sha256_files, sha256_json
from edgellm.data import read_text, resolve_text, token_windows, tokenize
from edgellm.errors import UserError
from edgellm.models import (
    ModelSource,
    check_weights_cover_config,
    load_model,
    load_tokenizer,
    resolve_source,
    save_hf_folder,
)
from edgellm.resources import check_room, count_parameters, export_need, load_need
from edgellm.runtimes.protocol import MeasureSpec, default_threads, measure_in_subprocess
from edgellm.source_meta import source_bos
from edgellm.tools import STEP_TOOLS, tool_versions


def eval_artifact(artifact: str, text: str, ctx: int, max_tokens: int | None,
                  decode_tokens: int, threads: int | None, console: Console) -> dict:
    """Perplexity and latency of one artifact (.gguf, ONNX/ORT model or folder, HF folder)
    in its runtime."""
    fmt, path, tokenizer_source = _artifact_kind(artifact)
    text_path = resolve_text(text)
    body, text_sha = read_text(text_path)
    with console.status("tokenizing"):
        tokenizer = load_tokenizer(tokenizer_source)
        ids = tokenize(tokenizer, body, max_tokens)
    bos = source_bos(tokenizer_source, tokenizer)  # windows start as the pipeline's do
    token_windows(ids, ctx, source=str(text_path), bos=bos)
    threads = threads or default_threads()
    with tempfile.TemporaryDirectory(prefix="edgellm-eval-") as tmp:
        import numpy as np

        ids_path = Path(tmp) / "ids.npy"
        np.save(ids_path, ids)
        spec = MeasureSpec(fmt=fmt, artifact=str(path), ids_path=str(ids_path), ctx=ctx,
                           decode_tokens=decode_tokens, threads=threads, bos=bos)
        measured = measure_in_subprocess(spec, Path(tmp))
    return {"artifact": str(path), "format": fmt, "size_bytes": artifact_size(path),
            "text": str(text_path), "sha256": text_sha, "tokens": measured["tokens_scored"],
            "ctx": ctx, "bos": bos, **measured}


def _artifact_kind(artifact: str) -> tuple[str, Path, ModelSource]:
    """(format, path the runtime opens, where the tokenizer comes from) of an artifact: the
    first registered format that claims it (export/formats/), else an HF folder for torch."""
    from edgellm.export.formats import formats

    path = Path(artifact).expanduser()
    for fmt in formats().values():
        opened = fmt.opens_path(path)
        if opened is not None:
            folder = path.parent if path.is_file() else path
            if not (folder / "tokenizer.json").is_file():
                raise UserError(f"{fmt.name} model {path} has no tokenizer.json beside it: "
                                f"export it with `edgellm export --to {fmt.name}`, which writes one")
            return fmt.name, opened, ModelSource("hf", str(folder), label=str(folder))
    source = resolve_source(artifact)
    for fmt in formats().values():
        opened = fmt.opens_source(source)
        if opened is not None:
            return fmt.name, opened, source
    return "torch", Path(source.path), source


def export_model(model: str, to: str, weights: str | None, out: Path, console: Console,
                 allow_pickle: bool = False,
                 force: bool = False) -> Path:
    """Export a model to `out/<name>-<weights>.gguf`, or the folder `out/<name>-<weights>-onnx/`
    (`-ort/`) holding the ONNX (ORT-format) model, its genai_config.json and tokenizer.
    `weights` None takes the format's lossless type."""
    import os
    import shutil

    from edgellm.artifacts import staged_dir
    from edgellm.export.formats import export_targets, formats
    from edgellm.recipe import ExportSpec
    from edgellm.run_checks import check_out_dir, check_source_for, prepare_out_dir

    if to not in export_targets():
        raise UserError(f"export target '{to}' is not supported: use --to "
                        f"{', '.join(export_targets())}")
    target_format = formats()[to]
    weights = weights or target_format.lossless
    if weights not in target_format.weights:
        raise UserError(f"weights '{weights}' not available for {to}: use one of "
                        f"{', '.join(target_format.weights)}")
    source = resolve_source(model, allow_pickle)
    check_out_dir(out, source)
    check_source_for(source, to, [])
    check_weights_cover_config(source)
    params = count_parameters(source.files())
    check_room([load_need(params), export_need(params, to, weights, [])], out, force)
    prepare_out_dir(out, source)
    folder = _hf_folder(source, out, console)
    stem = Path(source.gguf_file).stem if source.gguf_file else Path(source.path).name
    # intermediates (the f32 GGUF quantized types start from) are keyed by the source's content
    work = out / "_work" / f"src-{sha256_files(source.files())[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    suffix = Path(target_format.artifact).suffix  # a file (.gguf) keeps it; a folder is named by format
    target = out / (f"{stem}-{weights}{suffix}" if suffix else f"{stem}-{weights}-{to}")
    with staged_dir(target) as staging, console.status(f"exporting {to} {weights}"):
        built = target_format.export(folder, staging, ExportSpec(format=to, weights=weights),
                                     stem, work)
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(built, target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def _hf_folder(source: ModelSource, out: Path, console: Console) -> Path:
    """An HF folder for the exporter: the source itself, or a saved safetensors copy of a
    GGUF source or of pickle weights."""
    if source.kind == "hf" and not source.pickle:
        return Path(source.path)
    from edgellm.artifacts import publish_dir, staged_dir, trusted

    key = sha256_json({"source": sha256_files(source.files()), "tools": tool_versions(STEP_TOOLS)})
    folder = out / "_work" / f"hf-{key[:12]}"
    if not trusted(folder, key):
        what = "loading the GGUF into torch (dequantizing)" if source.kind == "gguf" \
            else "loading the pickle weights into torch"
        with console.status(what), \
                staged_dir(folder) as staging:
            save_hf_folder(load_model(source), load_tokenizer(source), source, staging)
        publish_dir(staging, folder, key, {"source": source.label})
    return folder


def compress_model(model: str, method: str, settings: list[str], calibration, out: Path,
                   console: Console, allow_pickle: bool = False,
                   force: bool = False) -> Path | None:
    """Apply one compression method to a model and write the result as an HF folder
    `out/<name>-<method>/`; `settings` are `key=value` method options (TOML values).
    Returns None in the non-first processes of a distributed launch."""
    import os
    import shutil

    from edgellm.artifacts import staged_dir
    from edgellm.compress import Context, apply_step
    from edgellm.recipe import parse_recipe
    from edgellm.run_checks import check_out_dir, check_source_for, prepare_out_dir

    step = {"method": method, **parse_settings(settings)}
    # validated like a recipe step, so errors read the same
    parse_recipe({"calibration": calibration.model_dump(),
                  "variant": [{"name": "cli", "compress": [step],
                               "export": {"format": "torch", "weights": "f32"}}]},
                 origin="command line")
    source = resolve_source(model, allow_pickle)
    rank = int(os.environ.get("RANK", "0"))  # set by accelerate launch / torchrun
    if rank > 0:
        return _follow(step, source, out, calibration, console, rank)
    check_out_dir(out, source)
    check_source_for(source, "torch", [method])
    check_weights_cover_config(source)
    params = count_parameters(source.files())
    check_room([load_need(params), export_need(params, "torch", "f32", [method])], out, force)
    prepare_out_dir(out, source)
    folder = _hf_folder(source, out, console)
    target = out / f"{_stem(source)}-{method}"
    context = Context(calibration=calibration, console=console, work=out / "_work",
                      resume=_resume_dir(out, target, folder, step, calibration))
    with staged_dir(target) as staging:
        apply_step(step, folder, staging, context)
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def _stem(source: ModelSource) -> str:
    return Path(source.gguf_file).stem if source.gguf_file else Path(source.path).name


def _resume_dir(out: Path, target: Path, folder: Path, step: dict, calibration) -> Path:
    identity = sha256_json([str(folder), step, calibration.model_dump()])
    return out / "_work" / f"{target.name}-{identity[:12]}.resume"


def _follow(step: dict, source: ModelSource, out: Path, calibration, console: Console,
            rank: int) -> None:
    """A non-first process of a distributed launch (distillation on several GPUs): it trains
    alongside process 0 and writes nothing; process 0 holds the lock and writes the result."""
    import shutil

    from edgellm.compress import Context, apply_step

    if source.kind != "hf":
        raise UserError(f"model {source.path}: a distributed run needs an HF folder: give the "
                        "folder a one-process `edgellm compress` (e.g. --method depth) wrote")
    target = out / f"{_stem(source)}-{step['method']}"
    scratch = out / "_work" / f"rank-{rank}"  # stays empty: only process 0 writes
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        apply_step(step, Path(source.path), scratch,
                   Context(calibration=calibration, console=console, work=out / "_work",
                           resume=_resume_dir(out, target, Path(source.path), step, calibration)))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def parse_settings(settings: list[str]) -> dict:
    """`key=value` pairs with TOML values (`sparsity=0.5`, `pattern="2:4"`, `act_order=true`);
    a bare word that is not TOML is taken as a string."""
    import tomllib

    options = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise UserError(f"option '{setting}' is not key=value: write e.g. --set bits=4")
        try:
            options[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            options[key.strip()] = value.strip()
    return options
