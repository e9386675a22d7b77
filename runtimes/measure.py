"""Child-process entry: `python -m edgellm.runtimes.measure PHASE SPEC.json RESULT.json`.

Imports only the runtime the spec names, measures, writes the result atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edgellm.artifacts import write_json_atomic
from edgellm.errors import UserError
from edgellm.runtimes.protocol import USER_ERROR_PREFIX, MeasureSpec, measure


def main(phase: str, spec_path: str, result_path: str) -> int:
    spec = MeasureSpec(**json.loads(Path(spec_path).read_text()))
    columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    try:
        with Progress(*columns, transient=True) as progress:
            result = measure(spec, phase, progress)
    except KeyboardInterrupt:
        return 130
    except UserError as exc:  # the parent shows this line as it is
        sys.stderr.write(f"{USER_ERROR_PREFIX}{exc}\n")
        return 2
    write_json_atomic(Path(result_path), result)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
