"""The `edgellm` command line: parses, calls one function, prints. The work lives elsewhere."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.exceptions import Abort, Exit, TyperException

from edgellm.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress, export and measure causal LMs for edge deployment.")
console = Console(stderr=False, soft_wrap=True)  # paths printed whole, never wrapped
err_console = Console(stderr=True)

OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]


def _format_help() -> tuple[str, str]:
    """--to and --weights help, from the format registry."""
    from edgellm.export.formats import export_targets, formats

    targets = [formats()[name] for name in export_targets()]
    to = ", ".join(f"{f.name} ({f.summary})" for f in targets) + "."
    weights = "; ".join(f"{f.name}: {', '.join(f.weights)}" for f in targets)
    defaults = ", ".join(f"{f.lossless} for {f.name}" for f in targets)
    return to, f"{weights}. Default: {defaults}."


TO_HELP, WEIGHTS_HELP = _format_help()
PickleOption = Annotated[bool, typer.Option(
    "--allow-pickle", help="Read a model folder of pickle weights (.bin/.pt); only for files "
    "you trust. Loaded with weights_only=True and saved as safetensors.")]
ForceOption = Annotated[bool, typer.Option(
    help="Go on when the estimated memory or disk need exceeds what the machine has.")]


@app.command()
def demo(out: OutOption = Path("edgellm-demo"),
         remeasure: Annotated[bool, typer.Option(help="Measure again even if cached.")] = False,
         force: ForceOption = False,
         max_tokens: Annotated[int | None, typer.Option(
             min=1, help="Score only the first N tokens (a quicker look; default 16,384).")] = None,
         calibration_samples: Annotated[int | None, typer.Option(
             min=1, help="Calibrate GPTQ and the importance matrix on N samples of 512 tokens "
             "(quicker, a little worse; default 64).")] = None):
    """Run the built-in recipe on SmolLM2-135M: GGUF, ONNX, GPTQ and Wanda variants vs torch."""
    from edgellm.recipe import builtin_recipe_path, load_recipe

    spec = load_recipe(builtin_recipe_path("demo"))
    if max_tokens is not None:
        spec.eval.max_tokens = max_tokens
    if calibration_samples is not None:
        spec.calibration.samples = calibration_samples
    run_spec(spec, out, remeasure, force)


@app.command()
def run(recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
        out: OutOption = Path("edgellm-out"),
        remeasure: Annotated[bool, typer.Option(help="Measure again even if cached.")] = False,
        allow_pickle: PickleOption = False, force: ForceOption = False):
    """Build every variant of RECIPE, measure each in its runtime, write report.json/.md/.html."""
    from edgellm.recipe import load_recipe

    spec = load_recipe(recipe)
    if allow_pickle:
        spec.model.allow_pickle = True
    run_spec(spec, out, remeasure, force)


def run_spec(spec, out: Path, remeasure: bool, force: bool) -> None:
    from edgellm.errors import no_room_is_user_error
    from edgellm.pipeline import run_recipe
    from edgellm.report_markdown import rich_table

    with no_room_is_user_error(out):
        report = run_recipe(spec, out, console, remeasure, force)
    console.print(rich_table(report["variants"]))


@app.command("eval")
def eval_command(
    artifact: Annotated[str, typer.Argument(help=".gguf file, ONNX/ORT model or folder, or HF folder.")],
    text: Annotated[str, typer.Option(help="Text file or built-in name.")] = "wikitext-2-raw-test",
    ctx: Annotated[int, typer.Option(min=16, help="Window length in tokens.")] = 512,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Cut the text here.")] = 16384,
    decode_tokens: Annotated[int, typer.Option(min=2, help="Greedy tokens timed.")] = 64,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Perplexity and latency of one artifact in its runtime."""
    from edgellm.standalone import eval_artifact

    result = eval_artifact(artifact, text, ctx, max_tokens, decode_tokens, threads,
                           err_console if as_json else console)
    if as_json:
        print(json.dumps(result))
    else:
        for key in ("artifact", "runtime", "ppl", "tokens", "size_bytes", "prefill_tps",
                    "decode_tps", "ttft_ms", "peak_rss_mb", "threads"):
            console.print(f"{key:>12}: {result[key]}")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Built-in name, HF folder, .gguf file or hub id.")],
    to: Annotated[str, typer.Option(help=TO_HELP)] = "gguf",
    weights: Annotated[str | None, typer.Option(help=WEIGHTS_HELP)] = None,
    out: OutOption = Path("edgellm-export"),
    allow_pickle: PickleOption = False,
    force: ForceOption = False,
    ollama: Annotated[bool, typer.Option(
        help="Also write an Ollama Modelfile beside the GGUF (`ollama create NAME -f …`).")]
    = False,
    max_size_mb: Annotated[float | None, typer.Option(
        min=0, help="Auto choice: measure --to's weight types (gguf, onnx, mlx), keep the "
                    "best that fits (report in OUT).")]
    = None,
    target_bpw: Annotated[float | None, typer.Option(
        min=0, help="Auto choice: the size budget as bits per weight of the file (bpw × "
                    "parameters / 8 bytes), instead of --max-size-mb.")]
    = None,
    max_ppl_increase_pct: Annotated[float | None, typer.Option(
        help="Auto choice: keep the smallest type within this perplexity increase.")] = None,
    candidates: Annotated[str | None, typer.Option(
        help="Auto choice: comma-separated types to try (default: GGUF f16 … q2_k, ONNX "
             "f32 … int4, MLX f16 … q4, and mixed: a type per tensor planned for "
             "--max-size-mb or --target-bpw).")] = None,
    text: Annotated[str, typer.Option(help="Auto choice: evaluation text.")]
    = "wikitext-2-raw-test",
    max_tokens: Annotated[int, typer.Option(min=1, help="Auto choice: tokens scored.")] = 16384,
    ctx: Annotated[int, typer.Option(min=16, help="Auto choice: window length.")] = 512,
):
    """Export MODEL to a deployable GGUF file or ONNX/ORT/MLX folder and print its path.
    With --max-size-mb (or --target-bpw) and/or --max-ppl-increase-pct, measure candidate
    types of --to (GGUF, ONNX or MLX) in its runtime and keep the one that meets the budgets
    best."""
    from edgellm.errors import no_room_is_user_error
    from edgellm.standalone import export_model

    if ollama and to != "gguf":
        raise UserError(f"--ollama needs --to gguf (Ollama runs GGUF files), not --to {to}")
    budgets = {"--max-size-mb": max_size_mb, "--target-bpw": target_bpw,
               "--max-ppl-increase-pct": max_ppl_increase_pct}
    auto = any(value is not None for value in budgets.values())
    for option, value in budgets.items():
        if value is not None and not math.isfinite(value):
            raise UserError(f"{option} {value} is not a finite number: give a budget such as 100")
    if max_size_mb is not None and target_bpw is not None:
        raise UserError("--max-size-mb and --target-bpw are the same budget: give one of them")
    if auto and weights:
        raise UserError("--max-size-mb/--target-bpw/--max-ppl-increase-pct choose the weight "
                        "type: leave --weights out (or list types in --candidates)")
    with no_room_is_user_error(out):
        if auto:
            from edgellm.auto import choose

            path, choice = choose(
                model, to, out, console, max_size_mb=max_size_mb, target_bpw=target_bpw,
                max_ppl_increase_pct=max_ppl_increase_pct,
                candidates=candidates.split(",") if candidates else None, text=text,
                max_tokens=max_tokens, ctx=ctx, allow_pickle=allow_pickle, force=force)
            console.print(f"chose {choice['weights']} ({choice['rule']}; "
                          f"{choice['budget_text']}); evidence in {out / 'report.md'}")
        else:
            path = export_model(model, to, weights, out, console,
                                allow_pickle, force)
        console.print(f"wrote {path}")
        if ollama:
            from edgellm.export.ollama import write_modelfile

            console.print(f"wrote {write_modelfile(path)}")


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help="Built-in name, HF folder, .gguf file or hub id.")],
    method: Annotated[str, typer.Option(help="Compression method: gptq, autoround, smoothquant, "
                                        "magnitude, wanda, sparsegpt, depth, width, distill.")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Method option as key=value, e.g. --set bits=4 (repeat).")] = None,
    calibration: Annotated[str, typer.Option(help="Calibration text file or built-in name.")]
    = "wikitext-2-valid",
    samples: Annotated[int, typer.Option(min=1, help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(min=16, help="Tokens per calibration window.")] = 512,
    out: OutOption = Path("edgellm-compress"),
    allow_pickle: PickleOption = False,
    force: ForceOption = False,
):
    """Apply one compression method to MODEL and write an HF folder; print its path."""
    from edgellm.errors import no_room_is_user_error
    from edgellm.recipe import CalibrationSpec
    from edgellm.standalone import compress_model

    spec = CalibrationSpec(text=calibration, samples=samples, seqlen=seqlen)
    with no_room_is_user_error(out):
        path = compress_model(model, method, set_ or [], spec, out, console,
                              allow_pickle, force)
    if path:  # None in the non-first processes of a distributed launch
        console.print(f"wrote {path}")


@app.command()
def report(out: Annotated[Path, typer.Argument(help="Run folder holding report.json.")]):
    """Rewrite report.md and report.html from OUT/report.json."""
    from edgellm.report_file import load_report, write_reports

    path = out / "report.json" if out.is_dir() else out
    data = load_report(path, figures=True, rendered=True)
    for written in write_reports(data, path.parent):
        console.print(f"wrote {written}")


@app.command()
def compare(
    base: Annotated[Path, typer.Argument(help="The base run's report.json (or its folder).")],
    new: Annotated[Path, typer.Argument(help="The new run's report.json (or its folder).")],
    markdown: Annotated[Path | None, typer.Option(help="Also write the table to this file.")] = None,
):
    """Show, per variant, how size, perplexity and decode speed changed between two runs."""
    from edgellm.artifacts import write_text_atomic
    from edgellm.compare import compare_reports

    paths = [p / "report.json" if p.is_dir() else p for p in (base, new)]
    if markdown is not None:
        check_file_target(markdown, "--markdown")
    text = compare_reports(*paths)
    print(text)
    if markdown:
        write_text_atomic(markdown, text + "\n")
        console.print(f"wrote {markdown}")


def check_file_target(path: Path, option: str) -> None:
    """Before any work: a file the command will write must not be a folder, and its folder
    must exist."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder: pass a file path")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: folder {path.parent} does not exist: create it or "
                        "pass another path")


@app.command()
def gate(
    report_path: Annotated[Path, typer.Argument(metavar="REPORT", help="report.json")],
    max_size_mb: Annotated[float | None, typer.Option(min=0)] = None,
    max_ppl_increase_pct: Annotated[float | None, typer.Option()] = None,
    min_decode_tps: Annotated[float | None, typer.Option(min=0)] = None,
    max_kl: Annotated[float | None, typer.Option(
        min=0, help="Mean KL divergence from the reference, nats.")] = None,
    budgets: Annotated[Path | None, typer.Option(
        help="Budgets TOML kept in the repo (top-level limits, [variant.NAME] overrides); "
             "options given here override its top-level limits.")] = None,
    variant: Annotated[list[str] | None, typer.Option(help="Gate only these (repeat).")] = None,
    junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here.")] = None,
):
    """Exit 0 when every variant is within budget, 1 when one is not, 2 on bad input."""
    from edgellm.gate import Budget, run_gate

    rows, breaches = run_gate(report_path, Budget(max_size_mb, max_ppl_increase_pct, min_decode_tps,
                                                  max_kl), budgets, variant, junit)
    for breach in breaches:  # report text is printed as it is: no rich markup, emoji or colour
        err_console.print(breach.message, markup=False, emoji=False, highlight=False, soft_wrap=True)
    if breaches:
        raise typer.Exit(1)
    console.print(f"gate: {len(rows)} variant(s) within budget")


def main() -> None:
    """Console entry: bad input is one line on stderr and exit 2; Ctrl-C exits 130, SIGTERM
    143 and SIGHUP 129, all three by the same path (staging removed, children ended)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader has its own bar
    previous = _catch_stop_signals()
    try:
        _refuse_empty_out(sys.argv[1:])
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C inside a command into exit code 130, silently
            _fail_interrupted()
    except UserError as exc:
        _fail(str(exc), exc.exit_code)
    except (KeyboardInterrupt, Abort):
        _fail_interrupted()
    except Exit as exc:
        code = exc.exit_code
        if code == 130:
            _fail_interrupted()
    except TyperException as exc:  # usage errors: bad option, missing argument
        context = getattr(exc, "ctx", None)
        command = context.command_path if context else "edgellm"
        _fail(f"{exc.format_message()} (see `{command} --help`)", 2)
    except OSError as exc:
        if exc.errno not in PATH_ERRORS:
            raise
        where = f"path {exc.filename}" if exc.filename else "a path given"
        _fail(f"{where} {PATH_ERRORS[exc.errno]}: pass another path", 2)
    finally:  # as they were (main() also runs inside tests' processes)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()
    sys.exit(code if isinstance(code, int) else 0)


# a path the user gave that the file system cannot take, wherever it is first used
PATH_ERRORS = {errno.ENAMETOOLONG: "has a name longer than the file system allows (255 bytes)",
               errno.ELOOP: "runs through a loop of symlinks"}

# SIGTERM and SIGHUP end a run as Ctrl-C does: they raise KeyboardInterrupt where the run
# is, so staging folders are removed and measuring children killed on the way out
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_received: list[int] = []  # the stop signals that arrived, first first


def _raise_interrupt(signum, frame) -> None:
    _received.append(signum)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _catch_stop_signals() -> dict:
    """Install the handler for SIGTERM and SIGHUP where they are left at their default (an
    ignored one stays ignored: nohup); returns the handlers to put back."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, *_STOP_SIGNALS)}
    if threading.current_thread() is threading.main_thread():
        for signum in _STOP_SIGNALS:
            if previous[signum] == signal.SIG_DFL:
                signal.signal(signum, _raise_interrupt)
    else:
        previous = {}
    return previous


def _fail_interrupted() -> None:
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, *_STOP_SIGNALS):  # the run is over: no 2nd traceback
            signal.signal(signum, signal.SIG_IGN)  # (main() puts the handlers back)
    if _received:
        _fail(f"terminated by {signal.Signals(_received[0]).name}", 128 + _received[0])
    _fail("interrupted", 130)


OUT_COMMANDS = ("demo", "run", "export", "compress")


def _refuse_empty_out(args: list[str]) -> None:
    """`--out ''` would become Path('.') and write into the current folder: refused here,
    where the empty text is still seen, before any work."""
    if not args or args[0] not in OUT_COMMANDS:
        return
    rest = iter(args[1:])
    for arg in rest:
        if arg == "--":
            return
        value = next(rest, None) if arg in ("--out", "-o") else \
            arg.removeprefix("--out=") if arg.startswith("--out=") else None
        if value is not None and not value.strip():
            raise UserError("--out is empty: pass a folder path (--out . for the current "
                            "folder)")


def _fail(message: str, code: int) -> None:
    try:  # after SIGHUP the terminal may be gone
        sys.stderr.write("error: " + " ".join(message.split()) + "\n")
        sys.stderr.flush()
    except OSError:
        pass
    sys.exit(code)


if __name__ == "__main__":
    main()
