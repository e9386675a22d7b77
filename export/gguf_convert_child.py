"""Child process of llama_converter: runs llama.cpp's convert_hf_to_gguf.py with the
converter's own gguf-py, and edgellm's few additions through its class hooks.

One process serves every conversion of an edgellm run (`serve`): it reads one JSON job per
line on stdin, writes the converter's output to the job's log, and answers one line with
the converter's exit code. Importing the converter (torch, transformers) takes ~5 s, which
a run exporting several GGUFs would otherwise pay each time.

A job: `args`, convert_hf_to_gguf.py's arguments; `log`, the file its output goes to;
`additions` (a JSON file, or null): `vocab`, a GGUF source's tokenizer.* fields written
instead of the converter's tokenizer (its own vocabulary, exactly), and `extra`, fields a
family adds that the converter omits (edgellm/archs/); `pre`, the pre-tokenizer name to
use where the converter's probe hash is unknown. The class hooks are put back after each job.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import types
from pathlib import Path


def add_fields(writer, fields: dict) -> None:
    """{key: {"type", "sub_type", "value"}} into a GGUFWriter."""
    import gguf

    for key, field in fields.items():
        sub = gguf.GGUFValueType(field["sub_type"]) if field["sub_type"] is not None else None
        writer.add_key_value(key, field["value"], gguf.GGUFValueType(field["type"]), sub)


def with_additions(additions: dict) -> None:
    from conversion.base import TextModel

    original = TextModel.prepare_metadata

    def prepare_metadata(self, vocab_only: bool):
        if additions.get("vocab"):
            self.set_vocab = types.MethodType(lambda model: add_fields(model.gguf_writer,
                                                                       additions["vocab"]), self)
        original(self, vocab_only)
        add_fields(self.gguf_writer, additions.get("extra") or {})

    TextModel.prepare_metadata = prepare_metadata


def known_pre(name: str) -> None:
    """get_vocab_base_pre falls back on `name` where the converter's hash is unknown."""
    from conversion.base import TextModel

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def run_job(converter: Path, job: dict) -> int:
    """One conversion in this process; the converter's exit code."""
    import gc
    import traceback

    from conversion.base import TextModel

    hooks = (TextModel.prepare_metadata, TextModel.get_vocab_base_pre)
    try:
        if job.get("additions"):
            with_additions(json.loads(Path(job["additions"]).read_text(encoding="utf-8")))
        if job.get("pre"):
            known_pre(job["pre"])
        sys.argv = [str(converter / "convert_hf_to_gguf.py"), *job["args"]]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        TextModel.prepare_metadata, TextModel.get_vocab_base_pre = hooks
        gc.collect()


def serve(converter: Path) -> None:
    """Answer jobs from stdin until it closes; die with the parent (Linux)."""
    _die_with_parent()
    sys.path[0:0] = [str(converter / "gguf-py"), str(converter)]
    answers = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        job = json.loads(line)
        with open(job["log"], "w") as log:
            code = _with_output_to(log, run_job, converter, job)
        answers.write(json.dumps({"rc": code}) + "\n")
        answers.flush()


def _with_output_to(log, work, *args):
    """Run `work(*args)` with file descriptors 1 and 2 (and Python's streams) sent to `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        return work(*args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _die_with_parent() -> None:
    """SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), so a killed run
    leaves no converter writing into its output folder."""
    if not sys.platform.startswith("linux"):
        return
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
