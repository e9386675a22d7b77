"""The evaluation protocol: perplexity over shared token windows, latency, peak memory.

`measure()` runs inside a process that loads only one runtime (see `measure_in_subprocess`)
so its peak RSS is its own and no other thread pool shares the cores.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgellm.errors import UserError


@dataclass
class MeasureSpec:
    """Everything a measuring process needs; written as JSON for the child."""

    fmt: str
    artifact: str  # file or folder the runtime opens
    ids_path: str  # .npy of the evaluation token ids (tokenized once by the parent)
    ctx: int = 512
    decode_tokens: int = 64
    threads: int = 2
    greedy_prompt_tokens: int = 32  # prompt length for the greedy-agreement tokens
    greedy_tokens: int = 16
    provider: str = "CPUExecutionProvider"  # ONNX Runtime execution provider
    topk_write: str | None = None  # the reference: save its top-k log-probs here (.npz)
    topk_read: str | None = None  # a variant: KL divergence from the reference saved here
    bos: int | None = None  # BOS id each window starts with (the model's tokenizer adds one)
    runtime: str | None = None  # the runtime registry's name; None: the format's default


def default_threads() -> int:
    """Physical cores where psutil knows them, else logical CPUs."""
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux this is VmHWM: getrusage's ru_maxrss survives fork+exec, so a child started
    by a parent holding a torch model would report the parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def measure(spec: MeasureSpec, phase: str, progress=None) -> dict:
    """One phase in this process: 'score' (perplexity, greedy tokens) or 'latency'."""
    from edgellm.data import token_windows
    from edgellm.runtimes import open_runtime

    ids = np.load(spec.ids_path)
    windows = token_windows(ids, spec.ctx, bos=spec.bos)
    runtime = open_runtime(spec.fmt, spec.artifact, spec.threads, spec.ctx, spec.provider,
                           spec.runtime)
    try:
        if phase == "score":
            result = _score(runtime, windows, progress, spec.topk_write, spec.topk_read)
            prompt = ids[: spec.greedy_prompt_tokens]
            if spec.bos is not None:  # BOS first where the model adds it
                prompt = np.concatenate([[spec.bos], prompt[:-1]]).astype(ids.dtype)
            greedy = runtime.generate(prompt, spec.greedy_tokens)
            result["greedy_tokens"] = greedy.tokens
        else:
            result = _latency(runtime, windows[0], spec.decode_tokens)
    finally:
        runtime.close()
    return {**result, "runtime": runtime.name, "runtime_version": runtime.version,
            "peak_rss_mb": peak_rss_mb(), "threads": spec.threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}


def _score(runtime, windows: list[np.ndarray], progress, topk_write: str | None = None,
           topk_read: str | None = None) -> dict:
    """Perplexity over the windows; with a reference's top-k file, KL divergence and top-1
    agreement too (the reference itself writes that file, then is compared with it)."""
    from edgellm.divergence import TopK, divergence, log_normalizer, summarize, top_k
    from edgellm.runtimes import nll_of_targets

    reference = TopK.load(Path(topk_read)) if topk_read else None
    positions = sum(len(w) - 1 for w in windows)
    if reference is not None and len(reference.ids) != positions:
        raise UserError(f"reference log-probabilities {topk_read} cover {len(reference.ids)} "
                        f"positions, the windows {positions}: rerun with --remeasure")
    nll_sum, scored, kls, agrees, parts = 0.0, 0, [], [], []
    task = progress.add_task("scoring windows", total=len(windows)) if progress else None
    for window in windows:
        logits = runtime.window_logits(window)
        log_norm = log_normalizer(logits)  # shared by the NLL and the divergence
        nll_sum += nll_of_targets(logits, window[1:], log_norm)
        if topk_write:
            parts.append(top_k(logits))
        ref = parts[-1] if topk_write else reference.window(scored, len(logits)) \
            if reference is not None else None
        if ref is not None:
            kl, agree = divergence(ref, logits, log_norm)
            kls.append(kl)
            agrees.append(agree)
        scored += len(logits)
        if progress:
            progress.advance(task)
    if topk_write:
        TopK.concat(parts).save(Path(topk_write))
    result = {"ppl": perplexity(nll_sum, scored), "nll_sum": nll_sum,
              "tokens_scored": scored, "windows": len(windows)}
    if kls:
        result.update(summarize(np.concatenate(kls), np.concatenate(agrees)))
    return result


def _latency(runtime, prompt: np.ndarray, decode_tokens: int) -> dict:
    """Prefill one ctx-long prompt, then decode greedily; a short warm-up run goes first
    so first-call allocations stay out of the timings."""
    runtime.generate(prompt[:8], 4)
    timed = runtime.generate(prompt, decode_tokens)
    steps = len(timed.tokens) - 1
    return {"prefill_tps": len(prompt) / timed.prefill_s,
            "decode_tps": steps / timed.decode_s if steps else None,
            "ttft_ms": timed.ttft_s * 1000, "prompt_tokens": len(prompt),
            "decode_tokens": len(timed.tokens)}


USER_ERROR_PREFIX = "edgellm-user-error: "  # a measuring child's bad-input line


def measure_in_subprocess(spec: MeasureSpec, work: Path) -> dict:
    """Score in one fresh process, time in another: each loads only its runtime, and the
    latency process's peak RSS is what an app running this artifact would hold."""
    score = _run_phase(spec, "score", work)
    latency = _run_phase(spec, "latency", work)
    return {**score, **latency, "score_peak_rss_mb": score["peak_rss_mb"]}


def _run_phase(spec: MeasureSpec, phase: str, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = work / f"{phase}.spec.json", work / f"{phase}.result.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "edgellm.runtimes.measure", phase, str(spec_path),
           str(result_path)]
    # its own process group (and session), ended with everything it started when this
    # process is interrupted (Ctrl-C, or SIGTERM/SIGHUP, which the CLI turns into the same)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate()
    except BaseException:
        # the whole group at once, SIGKILL: the child's work is thrown away (its temporary
        # result file is removed below); the group's id cannot be reused while the leader is
        # unreaped or any member lives, so this never reaches an unrelated process
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        result_path.with_name(f".{result_path.name}.tmp-{proc.pid}").unlink(missing_ok=True)
        raise
    finally:
        spec_path.unlink(missing_ok=True)
    if proc.returncode in (130, -2):
        raise KeyboardInterrupt
    if proc.returncode != 0 or not result_path.is_file():
        fallback = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
                    else f"exit code {proc.returncode}, no message")
        lines = (stderr or "").strip().splitlines() or [fallback]
        if proc.returncode == 2 and lines[-1].startswith(USER_ERROR_PREFIX):
            raise UserError(lines[-1].removeprefix(USER_ERROR_PREFIX))
        raise MeasureError(f"{phase} of {spec.artifact} failed in the {spec.fmt} runtime: "
                           f"{lines[-1]}", stderr)
    result = json.loads(result_path.read_text())
    result_path.unlink()
    return result


class MeasureError(UserError):
    """A measuring process failed; `log` holds its stderr."""

    def __init__(self, message: str, log: str):
        super().__init__(message)
        self.log = log
