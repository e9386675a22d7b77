"""Benchmark: GPTQ on SmolLM2-135M, its time and peak memory against the model's size.

    python bench/gptq.py [--grid q4_0] [--samples 32 64] [--seqlen 512] [--out bench-gptq]

The solver runs in a child process per calibration size (so each peak RSS is its own) on
the HF folder of the embedded model, one decoder layer at a time. The target is under two
minutes on 2 cores: 32 × 512 calibration tokens meet it; 64 × 512 is the demo's setting.
Quality of the results is in bench/run.py (the demo recipe's GPTQ rows) and README; this
one is about cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console


def child(model_dir: str, dest: str, grid: str, samples: int, seqlen: int) -> None:
    from edgellm.compress import Context, apply_step
    from edgellm.recipe import CalibrationSpec
    from edgellm.runtimes.protocol import peak_rss_mb

    calibration = CalibrationSpec(samples=samples, seqlen=seqlen)
    start = time.perf_counter()
    apply_step({"method": "gptq", "grid": grid}, Path(model_dir), Path(dest),
               Context(calibration=calibration, console=Console(stderr=True)))
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()  # VmHWM: ru_maxrss would carry the parent's peak across exec
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="q4_0", choices=["q4_0", "q5_0", "q8_0", "nbits"])
    parser.add_argument("--samples", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench-gptq"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.grid, args.samples[0], args.seqlen)
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    from edgellm.models import resolve_source
    from edgellm.run_checks import prepare_out_dir
    from edgellm.standalone import _hf_folder

    console = Console(stderr=True)
    prepare_out_dir(args.out)
    model_dir = _hf_folder(resolve_source("smollm2-135m"), args.out, console)
    model_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
    rows = []
    for samples in args.samples:
        dest = args.out / f"gptq-{args.grid}-{samples}x{args.seqlen}"
        result = run_child(model_dir, dest, args.grid, samples, args.seqlen)
        out_mb = sum(p.stat().st_size for p in dest.glob("*.safetensors")) / 2**20
        rows.append(f"| {args.grid} | {samples}×{args.seqlen} | {result['seconds']:.0f} | "
                    f"{result['peak_rss_mb']:.0f} | {model_mb:.0f} | {out_mb:.0f} | {os.cpu_count()} |")
        console.print(f"wrote {dest}")
    print("| grid | calibration | seconds | peak RSS MB | fp32 model MB | checkpoint MB | threads |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


def run_child(model_dir: Path, dest: Path, grid: str, samples: int, seqlen: int) -> dict:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--grid", grid, "--samples", str(samples),
           "--seqlen", str(seqlen), "--child", str(model_dir), str(dest)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


if __name__ == "__main__":
    main()
