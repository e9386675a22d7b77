"""The format registry: every artifact format edgellm writes, one module each.

A format module defines one `Format` subclass instance, `FORMAT`: its weight types and the
lossless default, the path a runtime opens inside a variant folder, the runtimes that open
it (by name in `edgellm.runtimes.RUNTIMES`), the tools whose versions key its builds, its
memory factor, the recipe options only it reads, what it needs of a model family, and
`export()`. Recipe validation, the pipeline, standalone export, the resource guard and the
CLI help all read this registry. Adding a format: a module here and one line in
`FORMAT_MODULES` (docs/design.md, "Adding a format").
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from edgellm.errors import UserError
from edgellm.registry import load_entries

# one line per format, in the order the CLI lists them
FORMAT_MODULES = ("torch", "gguf", "onnx", "ort", "mlx")
FLOAT_WEIGHTS = {"f32": 32.0, "fp32": 32.0, "f16": 16.0, "fp16": 16.0, "bf16": 16.0}


class Format:
    """What the rest of edgellm knows of one format; subclasses fill in the class fields."""

    name: str
    summary: str  # a few words for the CLI help
    weights: tuple[str, ...]  # what `export.weights` may say
    lossless: str | None  # the type `edgellm export --to NAME` writes by default (None: not a target)
    runtimes: tuple[str, ...]  # runtimes that open it, the default first
    build_tools: tuple[str, ...]  # packages whose versions key a build (all in tools.TOOL_PACKAGES)
    memory_factor: float = 3.0  # peak RAM of an export, in fp32 model sizes (resources.py)
    options: tuple[str, ...] = ()  # ExportSpec fields only this format reads
    family_need: tuple[str, str] | None = None  # (what, Family field that must be set)
    artifact: str = ""  # what the runtime opens inside a variant folder ("": the folder)
    own_rope: bool = True  # rebuilds the rotary embedding: only rope scalings archs/ routes
    # the single types `edgellm export --max-size-mb` measures by default, best first
    # (with a size budget, "mixed" joins them where the format plans a type per tensor)
    auto_candidates: tuple[str, ...] = ()
    budget_artifact: str = ""  # what a size budget's floor names ("GGUF", "ONNX file")

    def artifact_path(self, folder: Path) -> Path:
        return folder / self.artifact if self.artifact else folder

    def complete(self, spec) -> None:
        """Fill in what an ExportSpec of this format implies (before it is checked)."""

    def describe(self, artifact: Path) -> dict:
        """Facts read from a built artifact for its report row (GGUF: tensor types)."""
        return {}

    def check_spec(self, spec) -> str | None:
        """A problem with an ExportSpec of this format that its fields alone cannot catch."""
        return None

    def resolve_budget(self, spec, params: int) -> None:
        """Turn a budget stated per weight into the size budget the export reads, for a
        model of `params` weights (before check_size): target_bpw → max_size_mb, for every
        format that takes one (others refuse target_bpw in their options)."""
        from edgellm.export.budget_spec import resolve_bpw

        resolve_bpw(spec, params)

    def check_size(self, spec, params: int) -> str | None:
        """A problem with the spec's size budget for a model of `params` weights, before any
        work: below the smallest file the budget's candidates can make."""
        from edgellm.export.budget_spec import size_floor_problem

        if spec.max_size_mb is None or not self.budget_artifact:
            return None
        return size_floor_problem(spec, params, self.candidate_bpw(spec.candidates, spec),
                                  self.budget_artifact)

    def candidate_bpw(self, candidates, spec) -> dict[str, float]:
        """Stored bits per weight of each per-tensor candidate type (formats with a budget)."""
        raise NotImplementedError(f"{self.name} takes no size budget")

    def bits_per_weight(self, weights: str) -> float:
        """Stored bits per parameter, rounded up (block scales included)."""
        if weights in FLOAT_WEIGHTS:
            return FLOAT_WEIGHTS[weights]
        digits = re.search(r"(\d+)", weights)
        return float(digits.group(1)) + 1.0 if digits else 32.0

    def opens_path(self, path: Path) -> Path | None:
        """For `edgellm eval`: what the runtime opens when `path` is an artifact of this
        format recognisable by its path alone, its tokenizer beside it (ONNX, ORT)."""
        return None

    def opens_source(self, source) -> Path | None:
        """For `edgellm eval`: what the runtime opens when the model source (models.ModelSource)
        is an artifact of this format (a GGUF file, an mlx-lm folder). An HF folder none
        claims is a torch artifact."""
        return None

    def intermediate_bytes(self, params: int, weights: str) -> int:
        """Bytes of intermediates under OUT/_work an export of `weights` leaves."""
        return 0

    def tensor_plan(self, model_dir: Path, spec, work: Path, calibration) -> dict | None:
        """For a spec that gives each tensor its own type: {"modules": {HF linear: type},
        "record": the plan the export writes}, worked out on `model_dir` (a compress step
        before the export, GPTQ, solves each linear onto its type); None otherwise."""
        return None

    def reads_calibration(self, spec) -> bool:
        """Whether exporting `spec` reads the calibration text (an importance matrix, a
        size budget's sensitivity pass): its variants are then keyed by that text too."""
        return spec.imatrix or spec.max_size_mb is not None

    def export(self, model_dir: Path, staging: Path, spec, name: str, work: Path,
               calibration=None) -> Path:
        """Write the artifact for `spec` from the HF folder `model_dir` into `staging`
        (a variant's staging folder) and return the path a runtime opens."""
        raise NotImplementedError


@cache
def formats() -> dict[str, Format]:
    """{name: Format} of every registered format."""
    return load_entries("edgellm.export.formats", FORMAT_MODULES, "FORMAT")


def format_of(name: str) -> Format:
    if name not in formats():
        raise UserError(f"export format '{name}' is not supported: use one of "
                        f"{', '.join(formats())}")
    return formats()[name]


def auto_targets() -> tuple[str, ...]:
    """Formats `edgellm export --max-size-mb/--max-ppl-increase-pct` chooses a type in."""
    return tuple(name for name, fmt in formats().items() if fmt.auto_candidates)


def export_targets() -> tuple[str, ...]:
    """Formats `edgellm export --to` writes: those with a lossless default."""
    return tuple(name for name, fmt in formats().items() if fmt.lossless)
