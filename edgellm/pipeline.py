"""The pipeline: build every variant of a recipe once, measure each in its runtime, report.

OUT/reference/   the unmodified model as an HF folder (the torch reference variant)
OUT/<variant>/   one folder per variant: its artifact, manifest.json, measurement.json
OUT/_work/       token ids and intermediates (the f32 GGUF that quantized types start from)
A variant is rebuilt only when its manifest's key (inputs' content hash + spec + tool
versions) changes; a measurement is redone only when its own key changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from rich.console import Console

from edgellm.artifact_stats import artifact_size, model_stats
from edgellm.artifacts import (
    MANIFEST,
    WORK,
    atomic_path,
    check_replaceable,
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
from edgellm.export.formats import format_of
from edgellm.models import (
    ModelSource,
    check_weights_cover_config,
    load_model,
    load_tokenizer,
    resolve_source,
    save_hf_folder,
)
from edgellm.recipe import REFERENCE, ExportSpec, Recipe, VariantSpec
from edgellm.report import VariantResult, build_report
from edgellm.report_file import write_reports
from edgellm.resources import Need, check_room, count_parameters, export_need, load_need
from edgellm.run_checks import (
    check_calibration_is_not_eval,
    check_calibration_length,
    check_families,
    check_out_dir,
    check_sizes,
    check_steps,
    check_text_length,
    prepare_out_dir,
    reads_calibration,
)
from edgellm.runtimes import RUNTIMES
from edgellm.runtimes.protocol import MeasureSpec, default_threads, measure_in_subprocess
from edgellm.source_meta import source_bos
from edgellm.tools import STEP_TOOLS, tool_versions


@dataclass
class EvalInput:
    text_path: Path
    text_sha256: str
    ids_path: Path
    tokens: int
    bos: int | None = None  # every window starts with this id (the tokenizer adds BOS)


@dataclass
class Run:
    """A recipe whose inputs passed every check, its reference built and measured: what
    building and measuring its variants needs, and the results so far."""

    recipe: Recipe
    out: Path
    console: Console
    source: ModelSource
    eval_input: EvalInput
    reference_key: str
    threads: int
    topk: Path  # the reference's top-k log-probabilities, which KL divergence is from
    remeasure: bool = False
    results: list[VariantResult] = field(default_factory=list)
    not_measured: list[dict] = field(default_factory=list)


def run_recipe(recipe: Recipe, out: Path, console: Console | None = None,
               remeasure: bool = False, force: bool = False) -> dict:
    """Build, measure and report every variant; returns the report dict. `force` goes on
    when the resource guard estimates too little memory or disk."""
    run = start_run(recipe, out, console, remeasure, force)
    for variant in recipe.variant:
        measure_built(run, variant, build_in(run, variant))
    return publish_report(run_report(run), run)


def start_run(recipe: Recipe, out: Path, console: Console | None = None,
              remeasure: bool = False, force: bool = False) -> Run:
    """Check every input (nothing is written before they pass), then build and measure the
    reference."""
    console = console or Console()
    out = Path(out)
    source = resolve_source(recipe.model.source, recipe.model.allow_pickle)
    check_out_dir(out, source)
    for name in [REFERENCE, *(v.name for v in recipe.variant)]:
        check_replaceable(out / name)
    # the cheap checks first (texts need no torch), then the model's, then step/export pairs
    text_path = resolve_text(recipe.eval.text)
    text, text_sha = read_text(text_path)
    check_text_length(text, recipe.eval.ctx, text_path)
    check_calibration_is_not_eval(recipe, text_sha)
    check_families(recipe, source)
    check_sizes(recipe, source)
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
    topk_key = sha256_json([reference_key, eval_input.ids_path.name, recipe.eval.ctx,
                            tool_versions(RUNTIMES["torch"].tools), TopK.FIELDS, TOP_K, TAIL_SAMPLES])
    run = Run(recipe, out, console, source, eval_input, reference_key, threads,
              out / WORK / f"reference-topk-{topk_key[:16]}.npz", remeasure)
    run.results.append(measure_variant(
        REFERENCE, ExportSpec(format="torch", weights="f32"), [], out / REFERENCE, reference_key,
        recipe, eval_input, threads, console, remeasure or not run.topk.is_file(),
        topk_write=run.topk))
    return run


def build_in(run: Run, variant: VariantSpec) -> str:
    """Build one variant of the run (unless up to date); returns its key."""
    return build_variant(variant, run.out, run.reference_key, run.console, run.recipe.calibration)


def measure_built(run: Run, variant: VariantSpec, key: str) -> None:
    """Measure a built variant against the run's reference and keep its result."""
    run.results.append(measure_variant(
        variant.name, variant.export, [s.method for s in variant.compress], run.out / variant.name,
        key, run.recipe, run.eval_input, run.threads, run.console, run.remeasure,
        topk_read=run.topk))


def skip_built(run: Run, variant: VariantSpec, size: int, reason: str) -> None:
    """Leave a built variant unmeasured; the report lists it under `not_measured`."""
    run.console.print(f"{variant.name}: not measured ({reason})")
    run.not_measured.append({"name": variant.name, "weights": variant.export.weights,
                             "size_bytes": size, "reason": reason})


def run_report(run: Run) -> dict:
    report = build_report(run.recipe, run.source, run.eval_input, run.results, run.out)
    if run.not_measured:
        report["not_measured"] = run.not_measured
    return report


def publish_report(report: dict, run: Run) -> dict:
    """Write report.json/.md/.html into the run's folder and say where."""
    for path in write_reports(report, run.out):
        run.console.print(f"wrote {path}")
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
    return artifact_size(format_of(export.format).artifact_path(folder))


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
    target = format_of(variant.export.format)
    # defaults included: a changed default must rebuild what it would change
    spec = variant.model_dump(exclude={"name"})
    steps = plan_steps(variant, out, reference_key, calibration, console)
    inputs = {"reference": reference_key, "spec": spec,
              "tools": tool_versions(target.build_tools)}
    if reads_calibration(variant):
        inputs["calibration"] = calibration.model_dump()
    if steps:  # the chain's last key: what every step's identity says decides its output
        inputs["steps"] = steps[-1].key
    key = sha256_json(inputs)
    folder = out / variant.name
    if trusted(folder, key):
        console.print(f"[dim]{variant.name}: up to date in {folder}[/dim]")
        return key
    model_dir, model_key = out / REFERENCE, reference_key
    for step in steps:
        build_step(step, console)
        model_dir, model_key = step.folder, step.key
    work = model_work(out, model_key)
    status = f"{variant.name}: exporting {variant.export.format} {variant.export.weights}"
    with staged_dir(folder) as staging, console.status(status):
        target.export(model_dir, staging, variant.export, variant.name, work, calibration)
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
    target = format_of(export.format)
    runtime = target.runtimes[0]
    artifact = target.artifact_path(folder)
    spec = MeasureSpec(fmt=export.format, runtime=runtime, artifact=str(artifact),
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
                               "runtime": runtime, "tools": tool_versions(RUNTIMES[runtime].tools)})
    cached = read_json(folder / "measurement.json")
    if cached and cached.get("key") == measure_key and not remeasure:
        console.print(f"[dim]{name}: measurement reused[/dim]")
        measured = cached["result"]
    else:
        console.print(f"{name}: measuring in {runtime} ({threads} threads)")
        measured = measure_in_subprocess(spec, folder.parent / WORK / f"measure-{name}")
        write_json_atomic(folder / "measurement.json", {"key": measure_key, "result": measured})
    manifest = read_manifest(folder) or {}
    return VariantResult(name=name, export=export, steps=steps, artifact=artifact,
                         measured=measured, manifest=manifest)


def model_work(out: Path, model_key: str) -> Path:
    """OUT/_work/ref-KEY: the intermediates made from one model (its f32 GGUF, importance
    matrix, Fisher pass), shared by every export and step that reads that model."""
    work = out / WORK / f"ref-{model_key[:12]}"
    work.mkdir(parents=True, exist_ok=True)
    return work


@dataclass
class PlannedStep:
    """One compression step of a variant's chain, before it runs: what it reads, where its
    output goes, and the key that names that output."""

    step: dict
    source: Path
    folder: Path
    key: str
    context: object  # edgellm.compress.Context


def plan_steps(variant: VariantSpec, out: Path, reference_key: str, calibration,
               console: Console) -> list[PlannedStep]:
    """The variant's compression chain with each step's key, computed without running any:
    a step's key hashes its input's key and its identity, so the last key changes whenever
    anything that decides any step's output does."""
    from edgellm.compress import Context, step_identity

    target = format_of(variant.export.format)
    planned, model_dir, model_key = [], out / REFERENCE, reference_key
    for step in (s.model_dump() for s in variant.compress):
        context = Context(calibration=calibration, export=variant.export, console=console,
                          work=out / WORK, teacher=out / REFERENCE,
                          tensor_types=partial(_tensor_plan, target, model_dir, variant.export,
                                               out, model_key, calibration))
        key = sha256_json({"input": model_key, "tools": tool_versions(STEP_TOOLS),
                           **step_identity(step, context)})
        folder = out / WORK / "steps" / f"{step['method']}-{key[:12]}"
        context.resume = folder.with_name(folder.name + ".resume")
        planned.append(PlannedStep(step, model_dir, folder, key, context))
        model_dir, model_key = folder, key
    return planned


def _tensor_plan(target, model_dir: Path, export: ExportSpec, out: Path, model_key: str,
                 calibration) -> dict:
    """The export's type per tensor for the model a step reads (work folder made on use)."""
    return target.tensor_plan(model_dir, export, model_work(out, model_key), calibration)


def build_step(planned: PlannedStep, console: Console) -> None:
    """Run one planned compression step on its input HF folder into OUT/_work/steps/, once:
    variants sharing a chain prefix (same inputs, options, calibration) share its output."""
    folder, key, step = planned.folder, planned.key, planned.step
    if trusted(folder, key):
        console.print(f"[dim]{step['method']}: reusing {folder}[/dim]")
        return
    from edgellm.compress import apply_step

    folder.parent.mkdir(parents=True, exist_ok=True)
    with staged_dir(folder) as staging:
        apply_step(step, planned.source, staging, planned.context)
    publish_dir(staging, folder, key, {"step": step, "input": str(planned.source),
                                       "tools": tool_versions()})
    console.print(f"{step['method']}: wrote {folder}")
