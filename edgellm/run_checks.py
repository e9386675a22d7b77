"""The checks a run makes before any long work: output folder, texts, families and rope,
context length, calibration length, compression steps against their exports. Each refuses
in one line (UserError), and none writes anything (check_out_dir makes and removes again
the folders it tests; prepare_out_dir is the one that creates the output folder, last).
"""

from __future__ import annotations

from pathlib import Path

from edgellm.artifacts import WORK, check_lock, clear_leftovers, lock_out_dir
from edgellm.data import read_text, resolve_text, tokenize
from edgellm.errors import UserError
from edgellm.models import ModelSource, source_family
from edgellm.recipe import Recipe


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


def check_sizes(recipe: Recipe, source: ModelSource) -> None:
    """Each variant's size budget (a target_bpw turned into max_size_mb for this model
    first) against the smallest file its format can hold."""
    from edgellm.export.formats import format_of
    from edgellm.resources import count_parameters

    params = None
    for variant in recipe.variant:
        spec, target = variant.export, format_of(variant.export.format)
        if params is None and (spec.max_size_mb is not None or spec.target_bpw is not None):
            params = count_parameters(source.files())
        if params:
            target.resolve_budget(spec, params)
        problem = params and target.check_size(spec, params)
        if problem:
            raise UserError(f"variant {variant.name}: {problem}")


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
    from edgellm.export.formats import format_of

    family, config = family or source_family(source)
    name = source.label or source.path
    target = format_of(fmt)
    if config is not None and target.own_rope:
        check_rope(config, name)
    check_variant(family, target.family_need, methods, name)


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


def check_text_length(text: str, ctx: int, path: Path) -> None:
    """Cheap early refusal: every token covers at least one byte."""
    if len(text.encode()) < ctx:
        raise UserError(f"text {path} is shorter than one window of {ctx} tokens: "
                        "use a longer text or a smaller --ctx")


def reads_calibration(variant) -> bool:
    """Whether building the variant reads the calibration text: a compression step, or an
    export that does (an importance matrix, a size budget, torch int8)."""
    from edgellm.export.formats import format_of

    return bool(variant.compress) or format_of(variant.export.format).reads_calibration(variant.export)


def check_calibration_is_not_eval(recipe: Recipe, eval_sha: str) -> None:
    """A model tuned on the text it is scored on reads better than it is."""
    if any(reads_calibration(v) for v in recipe.variant):
        calibration_path = resolve_text(recipe.calibration.text)
        if read_text(calibration_path)[1] == eval_sha:
            raise UserError(f"[calibration] text {calibration_path} is the evaluation text: a "
                            "model tuned on the text it is scored on reads better than it is; "
                            "calibrate on another text (the default is wikitext-2-valid)")
