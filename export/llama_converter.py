"""llama.cpp's own HF → GGUF converter, at the exact commit of the llama.cpp runtime.

Why this and not our own writer (README, "GGUF export"): llama.cpp's converter already knows
every family's hparam keys, tensor names and transforms (Llama's rope permutation, Gemma's
(1+w) norms, Llama 3's rope_freqs, LongRoPE factors, fused Phi-3 projections, q/k norms)
and its tokenizer rules (BPE pre-tokenizer hashes, SentencePiece, chat templates, BOS/EOS
flags); a hand-written table would lag it on each new family. The llama-cpp-python sdist
that pip builds carries `convert_hf_to_gguf.py`, `conversion/` and `gguf-py` at the runtime's
commit, so what it writes is what the runtime reads. `install` extracts those three from the
sdist of the installed llama-cpp-python version (pip downloads it; `make install` runs it);
nothing of llama.cpp's code lives in this repository.

The converter runs in a child process (export/gguf_convert_child.py) with its own gguf-py
first on the path, so its gguf and ours never meet in one interpreter; one such process
serves all the conversions of a run.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from edgellm.errors import UserError

ENV = "EDGELLM_LLAMA_CPP_CONVERTER"  # a folder holding convert_hf_to_gguf.py, conversion/, gguf-py/
PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
INSTALL = "python -m edgellm.export.llama_converter install (make install runs it)"
# sha256 of tokenizer.json's "pre_tokenizer" section → llama.cpp pre-tokenizer name. The
# converter names a BPE pre-tokenizer by hashing the tokens of a probe text, which depends
# on the vocabulary too: a retrained or pruned vocabulary behind the same regex is unknown
# to it. These sections fix the regex alone, so the name follows from them.
PRE_TOKENIZERS: dict[str, str] = {
    # Sequence[Digits(individual), ByteLevel]: SmolLM/StarCoder
    "88e46f2b7ff38881b25bdcbd53c00c71a177d17bb9af73bec520e942c76aee6c": "smollm",
    # plain ByteLevel with the GPT-2 regex
    "baad9354616c54e28804f1ac4dc6f27c3032867d2da3f9106a8d12ac859680f0": "gpt-2",
}


def runtime_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise UserError("GGUF export needs llama-cpp-python: pip install 'edgellm[llamacpp]' "
                        "(or make install)") from None


def default_dir() -> Path:
    return Path(sys.prefix) / "share" / "edgellm" / f"llama.cpp-converter-{runtime_version()}"


def converter_dir() -> Path:
    """The converter's folder: $EDGELLM_LLAMA_CPP_CONVERTER, else the installed one."""
    folder = Path(os.environ[ENV]) if os.environ.get(ENV) else default_dir()
    if not all((folder / part).exists() for part in PARTS):
        raise UserError(f"llama.cpp's GGUF converter is not installed in {folder}: run `{INSTALL}`, "
                        f"or set {ENV} to a llama.cpp checkout")
    return folder


def install(dest: Path | None = None) -> Path:
    """Extract the converter from the sdist of the installed llama-cpp-python version."""
    dest = dest or default_dir()
    if all((dest / part).exists() for part in PARTS):
        return dest
    version = runtime_version()
    with tempfile.TemporaryDirectory(prefix="edgellm-llama-sdist-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary", ":all:", f"llama-cpp-python=={version}", "-d", tmp],
                       check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        staging = Path(tmp) / "converter"
        with tarfile.open(sdist) as archive:
            root = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers()
                       if any(m.name == root + p or m.name.startswith(root + p + "/") for p in PARTS)]
            for member in members:
                member.name = member.name[len(root):]
            archive.extractall(staging, members=members, filter="data")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(staging, dest)
    return dest


def convert(folder: Path, out_path: Path, outtype: str, work: Path, vocab: dict | None = None,
            extra: dict | None = None, metadata: dict | None = None) -> None:
    """Run the converter on the HF folder: `outtype` f32/f16/bf16 into `out_path`. `vocab`
    (a GGUF source's tokenizer.* fields, {key: {type, sub_type, value}}) replaces the
    converter's tokenizer with the source's own; `extra` fields are added (a family's keys
    the converter omits); `metadata` ({general.* key: value}) overrides what it reads from
    the folder (the name apps show)."""
    work.mkdir(parents=True, exist_ok=True)
    stem = out_path.name.lstrip(".").split(".")[0] + f"-{outtype}"  # a temp name starts with "."
    log, override = work / f"convert-{stem}.log", work / f"metadata-{stem}.json"
    additions = work / f"additions-{stem}.json"
    override.write_text(json.dumps(metadata or {}))
    additions.write_text(json.dumps({"vocab": vocab, "extra": extra or {}}))
    job = {"args": [str(folder), "--outtype", outtype, "--outfile", str(out_path),
                    "--metadata", str(override)],
           "additions": str(additions), "pre": known_pre_tokenizer(folder), "log": str(log)}
    code = _WORKER.run(job)
    if code != 0:
        from edgellm.errors import no_room_reason

        text = log.read_text(errors="replace") if log.is_file() else ""
        if no_room_reason(OSError(text)):  # the child ran out of disk: the caller's one line
            raise OSError(errno.ENOSPC, f"no space left writing {out_path}")
        lines = [line for line in text.splitlines() if line.strip()]
        raise UserError(f"llama.cpp's converter could not convert {folder} "
                        f"({(lines or ['no output'])[-1][:240]}): see {log}")


class _Worker:
    """The converter process of this edgellm process (export/gguf_convert_child.py), started
    on the first conversion, in its own process group; ended with everything it runs when
    a conversion is interrupted, and at exit."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.folder: Path | None = None
        atexit.register(self.close)

    def run(self, job: dict) -> int:
        folder = converter_dir()
        if self.proc is not None and (self.proc.poll() is not None or folder != self.folder):
            self.close()
        if self.proc is None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edgellm.export.gguf_convert_child", str(folder)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
            self.folder = folder
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        except BrokenPipeError:
            answer = ""
        except BaseException:  # Ctrl-C, or SIGTERM/SIGHUP turned into it: nothing goes on
            self.kill()
            raise
        if not answer:  # the process died: its signal or exit code is the job's
            code = self.proc.wait()
            self.proc = None
            if code in (-signal.SIGINT, 130):
                raise KeyboardInterrupt
            return code or 1
        return json.loads(answer)["rc"]

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


_WORKER = _Worker()


def known_pre_tokenizer(folder: Path) -> str | None:
    """The llama.cpp pre-tokenizer of a BPE tokenizer.json whose pre_tokenizer section is
    one we know, else None (then the converter's own hash decides)."""
    from edgellm.artifacts import sha256_json

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        section = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return PRE_TOKENIZERS.get(sha256_json(section))


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m edgellm.export.llama_converter install")
    print(install())
