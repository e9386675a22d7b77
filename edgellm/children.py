"""Child processes that do a run's work (ONNX builder, ORT converter): each in its own
process group, ended with everything it started when the run is interrupted (Ctrl-C, or
SIGTERM/SIGHUP, which the CLI turns into the same), so nothing keeps writing into the
output folder after edgellm has exited."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def run_logged(cmd: list[str], log: Path) -> int:
    """Run `cmd` with its output in `log`; its exit code. A signal the child dies of from a
    Ctrl-C at the terminal is the run's interrupt."""
    with open(log, "w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if code in (-signal.SIGINT, 130):
        raise KeyboardInterrupt
    return code
