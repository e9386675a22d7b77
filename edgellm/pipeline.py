"""The pipeline: build every variant of a recipe once, measure each in its runtime, report.

OUT/reference/   the unmodified model as an HF folder (the torch reference variant)
OUT/<variant>/   one folder per variant: its artifact, manifest.json, measurement.json
OUT/_work/       token ids and intermediates (the f32 GGUF that quantized types start from)
A variant is rebuilt only when its manifest's key (inputs' content hash + spec + tool
versions) changes; a measurement is redone only when its own key changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from edgellm.artifacts import (
    MANIFEST,
    atomic_path,
    check_lock,
    check_replaceable,
    clear_leftovers,
    lock_out_dir,
    publish_dir,
    read_json,
    read_manifest,
    sha256_files,
    sha256_json,
    staged_dir,
    trusted,
    write_json_atomic,
)
from edgellm.data import read_text, resolve_text, token_windows, tokenize
from edgellm.divergence import TAIL_SAMPLES, TOP_K, TopK
from edgellm.errors import UserError
from edgellm.models import (
    ModelSource,
    check_weights_cover_config,
    load_model,
    load_tokenizer,
    resolve_source,
    save_hf_folder,
    source_family,
)
from edgellm.recipe import REFERENCE, ExportSpec, Recipe, VariantSpec
from edgellm.report import VariantResult, build_report, model_stats
from edgellm.report_file import write_reports
from edgellm.resources import Need, check_room, count_parameters, export_need, load_need
from edgellm.runtimes.protocol import MeasureSpec, default_threads, measure_in_subprocess
from edgellm.source_meta import source_bos
from edgellm.tools import BUILD_TOOLS, RUN_TOOLS, STEP_TOOLS, tool_versions

WORK = "_work"


@dataclass
class EvalInput:
    text_path: Path
    text_sha256: str
    ids_path: Path
    tokens: int
    bos: int | None = None  # every window starts with this id (the tokenizer adds BOS)


def run_recipe(recipe: Recipe, out: Path, console: Console | None = None,
               remeasure: bool = False, force: bool = False, measure_if=None) -> dict:
    """Build, measure and report every variant; returns the report dict. `force` goes on
    when the resource guard estimates too little memory or disk. `measure_if(name, size)`,
    when given, may return a reason not to measure a built variant (it is then listed under
    the report's `not_measured`)."""
    console = console or Console()
    out = Path(out)
    source = resolve_source(recipe.model.source, recipe.model.allow_pickle)
    check_out_dir(out, source)
    for name in [REFERENCE, *(v.name for v in recipe.variant)]:
        check_replaceable(out / name)
    # the cheap checks first (texts need no torch), then the model's, then step/export pairs
    text_path = resolve_text(recipe.eval.text)
    text, text_sha = read_text(text_path)
    _check_text_length(text, recipe.eval.ctx, text_path)
    if any(v.export.imatrix or v.compress for v in recipe.variant):
        calibration_path = resolve_text(recipe.calibration.text)
        if read_text(calibration_path)[1] == text_sha:
            raise UserError(f"[calibration] text {calibration_path} is the evaluation text: a "
                            "model tuned on the text it is scored on reads better than it is; "
                            "calibrate on another text (the default is wikitext-2-valid)")
    check_families(recipe, source)
    check_weights_cover_config(source)
    check_steps(recipe)
    with console.status("reading tokenizer"):
        tokenizer = load_tokenizer(source)
        ids = tokenize(tokenizer, text, recipe.eval.max_tokens)
        bos = source_bos(source, tokenizer)
    token_windows(ids, recipe.eval.ctx, source=str(text_path), bos=bos)
    check_calibration_length(recipe, tokenizer, bos)
    check_room(recipe_needs(recipe, source, out), out, force)
    prepare_out_dir(out, source)  # only now, so bad input leaves nothing behind
    reference_key = build_reference(source, recipe, tokenizer, out / REFERENCE, console)
    eval_input = save_eval_ids(out, ids, text_path, text_sha, bos)
    threads = recipe.eval.threads or default_threads()
    # the reference's next-token distributions, which every variant's KL divergence is from
    topk_key = sha256_json([reference_key, eval_input.ids_path.name, recipe.eval.ctx,
                            tool_versions(RUN_TOOLS["torch"]), TopK.FIELDS, TOP_K, TAIL_SAMPLES])
    topk = out / WORK / f"reference-topk-{topk_key[:16]}.npz"
    results = [measure_variant(REFERENCE, ExportSpec(format="torch", weights="f32"), [],
                               out / REFERENCE, reference_key, recipe, eval_input, threads,
                               console, remeasure or not topk.is_file(), topk_write=topk)]
    skipped = []
    for variant in recipe.variant:
        key = build_variant(variant, out, reference_key, console, recipe.calibration)
        size = built_size(out / variant.name, variant.export) if measure_if else 0
        reason = measure_if and measure_if(variant.name, size)
        if reason:
            console.print(f"{variant.name}: not measured ({reason})")
            skipped.append({"name": variant.name, "weights": variant.export.weights,
                            "size_bytes": size, "reason": reason})
            continue
        results.append(measure_variant(variant.name, variant.export,
                                       [s.method for s in variant.compress], out / variant.name,
                                       key, recipe, eval_input, threads, console, remeasure,
                                       topk_read=topk))
    report = build_report(recipe, source, eval_input, results, out)
    if skipped:
        report["not_measured"] = skipped
    paths = write_reports(report, out)
    for path in paths:
        console.print(f"wrote {path}")
    return report


def recipe_needs(recipe: Recipe, source: ModelSource, out: Path) -> list[Need]:
    """Memory and disk for what is left to build: the reference and the variants that have
    no manifest yet (a rough count: a stale variant rebuilt later is not foreseen)."""
    params = count_parameters(source.files())
    needs = []
    if not (out / REFERENCE / MANIFEST).is_file():
        needs.append(load_need(params))
    for variant in recipe.variant:
        if not (out / variant.name / MANIFEST).is_file():
            needs.append(export_need(params, variant.export.format, variant.export.weights,
                                     [s.method for s in variant.compress]))
    return needs


def built_size(folder: Path, export: ExportSpec) -> int:
    """Bytes of a built variant's artifact (what the report's size_bytes would say)."""
    from edgellm.export.build import artifact_path
    from edgellm.report import artifact_size

    return artifact_size(artifact_path(folder, export))


def check_steps(recipe: Recipe) -> None:
    """Each compression step against its variant's export (GPTQ needs the export's grid)."""
    from edgellm.compress import Context, step_identity

    for variant in recipe.variant:
        for step in variant.compress:
            try:
                step_identity(step.model_dump(), Context(recipe.calibration, variant.export))
            except UserError as exc:
                raise UserError(f"variant {variant.name}: {exc}") from None


def check_families(recipe: Recipe, source: ModelSource) -> None:
    """Every variant's export and steps against the model's architecture (edgellm/archs/),
    and its rope scaling against what the exporters handle: refused before any work."""
    family = source_family(source)
    check_context(recipe.eval.ctx, source, family[1])
    for variant in recipe.variant:
        try:
            check_source_for(source, variant.export.format, [s.method for s in variant.compress],
                             family)
        except UserError as exc:
            raise UserError(f"variant {variant.name}: {exc}") from None


def check_calibration_length(recipe: Recipe, tokenizer, bos: int | None) -> None:
    """The calibration text holds the windows every step that reads it asks for (a step's
    own `samples`, else [calibration].samples), counted with the model's tokenizer now
    rather than after the reference is built."""
    cal = recipe.calibration
    wanted = [cal.samples for v in recipe.variant if v.export.imatrix]
    wanted += [step.model_dump().get("samples") or cal.samples
               for v in recipe.variant for step in v.compress]
    if not wanted:
        return
    path = resolve_text(cal.text)
    need = max(wanted) * (cal.seqlen - 1 if bos is not None else cal.seqlen)
    have = len(tokenize(tokenizer, read_text(path)[0], need))
    if have < need:
        raise UserError(f"calibration text {path} has {have} tokens, fewer than samples × seqlen = "
                        f"{max(wanted)} × {cal.seqlen}: lower samples/seqlen or use a longer text")


def check_context(ctx: int, source: ModelSource, config: dict | None) -> None:
    """A window longer than the model was trained for is scored past its positions (rope
    beyond its range, or an index error): refused, naming the model's length."""
    from edgellm.models import context_length

    limit = context_length(source, config)
    if limit and ctx > limit:
        raise UserError(f"[eval] ctx {ctx} is longer than {source.label or source.path}'s "
                        f"context of {limit} tokens: use ctx ≤ {limit}")


def check_source_for(source: ModelSource, fmt: str, methods: list[str], family=None) -> None:
    """One export format and chain of steps against the source's family and rope scaling
    (`family`: what source_family(source) returned, when the caller has it)."""
    from edgellm.archs import check_rope, check_variant

    family, config = family or source_family(source)
    name = source.label or source.path
    if config is not None and fmt != "torch":
        check_rope(config, name)
    check_variant(family, fmt, methods, name)


def check_out_dir(out: Path | str, source: ModelSource | None = None) -> None:
    """Refuse an output path that is empty, a file, cannot be created or (given the model
    `source`) is an HF model's own folder or lies inside it, leaving nothing
    behind: the folders of `out` that do not exist yet are made, then removed again (the
    run makes them for good only once every input has been checked)."""
    if isinstance(out, str) and not out.strip():
        raise UserError("--out is empty: pass a folder path (--out . for the current folder)")
    out = Path(out)
    if source is not None and source.kind == "hf":  # its folder is hashed: keep out of it
        model, target = Path(source.path).expanduser().resolve(), out.expanduser().resolve()
        if target == model or model in target.parents:
            where = "is the model's folder" if target == model else "is inside the model's folder"
            raise UserError(f"output folder {out} {where} {source.path}: the run would write "
                            "into the model; choose an --out outside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file: pass a folder path to --out")
    if out.is_dir():
        check_lock(out)
    missing, level = [], out.resolve()
    while not level.exists():
        missing.append(level)
        level = level.parent
    try:
        for folder in reversed(missing):
            folder.mkdir()
    except OSError as exc:
        raise UserError(f"cannot create output folder {out} ({exc.strerror}): "
                        "choose a writable --out") from None
    finally:
        for folder in missing:
            if folder.is_dir():
                folder.rmdir()


def prepare_out_dir(out: Path | str, source: ModelSource | None = None) -> None:
    check_out_dir(out, source)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock_out_dir(out)  # first: a folder that is busy or has a bad lock file is left as it is
        (out / WORK).mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out} ({exc.strerror}): "
                        "choose a writable --out") from None
    clear_leftovers(out)  # safe: the lock says no other run is writing here


def _check_text_length(text: str, ctx: int, path: Path) -> None:
    """Cheap early refusal: every token covers at least one byte."""
    if len(text.encode()) < ctx:
        raise UserError(f"text {path} is shorter than one window of {ctx} tokens: "
                        "use a longer text or a smaller --ctx")


def build_reference(source: ModelSource, recipe: Recipe, tokenizer, folder: Path,
                    console: Console) -> str:
    """Save the unmodified model as an HF folder once; its key is the source's content hash."""
    source_hash = sha256_files(source.files())
    key = sha256_json({"source": source_hash, "tools": tool_versions(STEP_TOOLS)})
    if trusted(folder, key):
        console.print(f"[dim]reference: up to date in {folder}[/dim]")
        return key
    with console.status(f"loading {source.label or source.path} into torch"), \
            staged_dir(folder) as staging:
        save_hf_folder(load_model(source), tokenizer, source,
                       staging)
    publish_dir(staging, folder, key, {"name": REFERENCE, "source": source.label,
                                       "source_sha256": source_hash, "steps": [],
                                       "export": {"format": "torch", "weights": "f32"},
                                       "model": model_stats(staging),
                                       "tools": tool_versions()})
    console.print(f"reference: saved {folder}")
    return key


def save_eval_ids(out: Path, ids: np.ndarray, text_path: Path, text_sha: str,
                  bos: int | None = None) -> EvalInput:
    ids_path = out / WORK / f"eval-ids-{sha256_json([text_sha, ids.tolist()])[:16]}.npy"
    if not ids_path.is_file():
        with atomic_path(ids_path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, ids)
    return EvalInput(text_path, text_sha, ids_path, len(ids), bos)


def build_variant(variant: VariantSpec, out: Path, reference_key: str, console: Console,
                  calibration=None) -> str:
    """Compress (when asked) and export one variant into OUT/<name>/ unless already there."""
    from edgellm.export.build import export_artifact

    # defaults included: a changed default must rebuild what it would change
    spec = variant.model_dump(exclude={"name"})
    inputs = {"reference": reference_key, "spec": spec,
              "tools": tool_versions(BUILD_TOOLS[variant.export.format])}
    if variant.export.imatrix or variant.compress:  # only variants that read calibration text
        inputs["calibration"] = calibration.model_dump()
    key = sha256_json(inputs)
    folder = out / variant.name
    if trusted(folder, key):
        console.print(f"[dim]{variant.name}: up to date in {folder}[/dim]")
        return key
    model_dir, model_key = out / REFERENCE, reference_key
    for step in variant.compress:
        model_dir, model_key = build_step(step.model_dump(), model_dir, model_key, out,
                                          variant.export, calibration, console)
    work = out / WORK / f"ref-{model_key[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    status = f"{variant.name}: exporting {variant.export.format} {variant.export.weights}"
    with staged_dir(folder) as staging, console.status(status):
        export_artifact(model_dir, staging, variant.export, variant.name, work, calibration)
    publish_dir(staging, folder, key, {"name": variant.name, "spec": spec,
                                       "steps": [s.method for s in variant.compress],
                                       "model": model_stats(model_dir),
                                       "tools": tool_versions()})
    console.print(f"{variant.name}: built {folder}")
    return key


def measure_variant(name: str, export: ExportSpec, steps: list[str], folder: Path, key: str,
                    recipe: Recipe, eval_input: EvalInput, threads: int, console: Console,
                    remeasure: bool, topk_write: Path | None = None,
                    topk_read: Path | None = None) -> VariantResult:
    from edgellm.export.build import artifact_path

    artifact = artifact_path(folder, export)
    spec = MeasureSpec(fmt=export.format, artifact=str(artifact),
                       ids_path=str(eval_input.ids_path), ctx=recipe.eval.ctx,
                       decode_tokens=recipe.eval.decode_tokens, threads=threads,
                       provider=recipe.eval.onnx_provider,
                       topk_write=str(topk_write) if topk_write else None,
                       topk_read=str(topk_read) if topk_read else None,
                       bos=eval_input.bos)
    measure_key = sha256_json({"artifact": key, "ids": eval_input.ids_path.name,
                               "bos": eval_input.bos,
                               "ctx": spec.ctx, "decode": spec.decode_tokens,
                               "threads": threads, "provider": spec.provider,
                               "topk": (topk_write or topk_read or Path()).name,
                               "tools": tool_versions(RUN_TOOLS[export.format])})
    cached = read_json(folder / "measurement.json")
    if cached and cached.get("key") == measure_key and not remeasure:
        console.print(f"[dim]{name}: measurement reused[/dim]")
        measured = cached["result"]
    else:
        console.print(f"{name}: measuring in {export.format} runtime ({threads} threads)")
        measured = measure_in_subprocess(spec, folder.parent / WORK / f"measure-{name}")
        write_json_atomic(folder / "measurement.json", {"key": measure_key, "result": measured})
    manifest = read_manifest(folder) or {}
    return VariantResult(name=name, export=export, steps=steps, artifact=artifact,
                         measured=measured, manifest=manifest)




def build_step(step: dict, model_dir: Path, model_key: str, out: Path, export: ExportSpec,
               calibration, console: Console) -> tuple[Path, str]:
    """Run one compression step on the HF folder `model_dir` into OUT/_work/steps/, once:
    variants sharing a chain prefix (same inputs, options, calibration) share its output."""
    from edgellm.compress import Context, step_identity

    context = Context(calibration=calibration, export=export, console=console,
                      work=out / WORK, teacher=out / REFERENCE)
    key = sha256_json({"input": model_key, "tools": tool_versions(STEP_TOOLS),
                       **step_identity(step, context)})
    folder = out / WORK / "steps" / f"{step['method']}-{key[:12]}"
    context.resume = folder.with_name(folder.name + ".resume")
    if trusted(folder, key):
        console.print(f"[dim]{step['method']}: reusing {folder}[/dim]")
        return folder, key
    from edgellm.compress import apply_step

    folder.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(folder) as staging:
        apply_step(step, model_dir, staging, context)
    publish_dir(staging, folder, key, {"step": step, "input": str(model_dir),
                                       "tools": tool_versions()})
    console.print(f"{step['method']}: wrote {folder}")
    return folder, key
