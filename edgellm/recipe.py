"""The recipe: a TOML file naming a model, an evaluation text and variants, validated by pydantic.

Unknown keys and bad values are errors that name the key and its line in the file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgellm.errors import UserError

REFERENCE = "reference"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# a variant's folder holds its name; its staging folder (.NAME.partial) and the files of a
# GGUF or ONNX export inside must still fit a file system's 255-byte names
MAX_NAME = 100
# what edgellm writes at the top of an output folder besides the variants' folders
RESERVED_NAMES = ("report.json", "report.md", "report.html", "manifest.json", "measurement.json")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Strict):
    source: str = "smollm2-135m"
    allow_pickle: bool = False  # read a folder of pickle weights (torch weights_only=True)


class EvalSpec(Strict):
    text: str = "wikitext-2-raw-test"
    max_tokens: int | None = Field(16384, gt=0)
    ctx: int = Field(512, ge=16, le=32768)
    decode_tokens: int = Field(64, ge=2, le=4096)
    threads: int | None = Field(None, ge=1, le=1024)
    # ONNX Runtime execution provider for onnx/ort variants (CoreML, CUDA where present)
    onnx_provider: Literal["CPUExecutionProvider", "CUDAExecutionProvider",
                           "CoreMLExecutionProvider"] = "CPUExecutionProvider"


class CalibrationSpec(Strict):
    text: str = "wikitext-2-valid"
    samples: int = Field(128, gt=0)
    seqlen: int = Field(512, ge=16)


class CompressStep(BaseModel):
    """One compression method and its arguments; each method validates its own arguments."""

    model_config = ConfigDict(extra="allow")
    method: str


class ExportSpec(Strict):
    """An export target: a format of the registry (export/formats/), its weight type, and
    the options only some formats read (each format lists its own)."""

    format: str
    weights: str = "f16"
    # ONNX MatMulNBits options (int4/int8 weight-only): block size, symmetric or with zero
    # points, MatMulNBits accuracy_level (4: int8 activations on CPU), tied lm_head bits.
    # Zero points by default: on SmolLM2 int4 they cut the perplexity increase from +36.3%
    # to +27.6% for 2.5 MB more (README, ONNX numbers).
    block_size: Literal[16, 32, 64, 128, 256] = 32
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    symmetric: bool = False
    lm_head_bits: Literal[4, 8] = 8
    # GGUF: weigh rounding errors by an importance matrix computed on [calibration] text
    imatrix: bool = False
    # GGUF under a size budget: one type per tensor among `candidates`, the least predicted
    # KL divergence within max_size_mb (export/gguf_budget.py); weights then read "mixed"
    max_size_mb: float | None = Field(None, gt=0, allow_inf_nan=False)
    # the same budget as bits per weight of the whole file (file bits / the model's
    # parameters, the report's bpw), turned into max_size_mb before any work
    target_bpw: float | None = Field(None, gt=0, allow_inf_nan=False)
    candidates: list[str] | None = None

    @field_validator("format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        from edgellm.export.formats import formats

        if name not in formats():
            raise ValueError(f"format '{name}' is not supported: use one of {', '.join(formats())}")
        return name

    @model_validator(mode="after")
    def _known_weights(self):
        from edgellm.export.formats import formats

        target = formats()[self.format]
        target.complete(self)
        if self.weights not in target.weights:
            raise ValueError(
                f"weights '{self.weights}' not available for {self.format}: "
                f"use one of {', '.join(target.weights)}"
            )
        for option in (o for o in self.model_fields_set if o not in ("format", "weights")):
            if option not in target.options:
                readers = [f.name for f in formats().values() if option in f.options]
                raise ValueError(f"{option} only applies to {'/'.join(readers)} exports")
        problem = target.check_spec(self)
        if problem:
            raise ValueError(problem)
        return self


class VariantSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN, max_length=MAX_NAME)
    compress: list[CompressStep] = []
    export: ExportSpec

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name == REFERENCE or name.startswith("_") or name.lower() in RESERVED_NAMES:
            raise ValueError(f"variant name '{name}' is reserved (edgellm writes a file or folder "
                             "of that name in the output folder): choose another")
        return name

    @field_validator("compress")
    @classmethod
    def _known_methods(cls, steps: list[CompressStep]) -> list[CompressStep]:
        from edgellm.compress import parse_options

        for step in steps:
            try:
                parse_options(step.model_dump())
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join(str(part) for part in error["loc"])
                message = error["msg"].removeprefix("Value error, ")
                raise ValueError(f"{step.method} option '{where}': {message}") from None
        return steps


class Recipe(Strict):
    model: ModelSpec = ModelSpec()
    eval: EvalSpec = EvalSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    variant: list[VariantSpec] = []

    @field_validator("variant")
    @classmethod
    def _unique_names(cls, variants: list[VariantSpec]) -> list[VariantSpec]:
        seen = set()
        for variant in variants:
            if variant.name in seen:
                raise ValueError(f"variant name '{variant.name}' appears twice")
            seen.add(variant.name)
        return variants


def load_recipe(path: Path) -> Recipe:
    """Read and validate a recipe file; every problem is one line naming key and line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder: pass a .toml recipe file")
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist: pass a .toml recipe file")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise UserError(f"recipe {path} is not UTF-8 text: save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"recipe {path} is not valid TOML: {exc}") from None
    return parse_recipe(data, text, str(path))


def parse_recipe(data: dict[str, Any], text: str = "", origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        shown = _toml_key(data, error["loc"])
        line = _line_of(text, shown)
        where = f"{origin}:{line}" if line else origin
        message = error["msg"].removeprefix("Value error, ")
        raise UserError(f"{where}: key '{key}': {message}") from None


def _toml_key(data: dict, loc: tuple) -> str:
    """The last named key on the error path, as it appears in the TOML text."""
    names = [part for part in loc if isinstance(part, str)]
    if names and names[-1] in ("variant",):
        return "[[variant]]"
    return names[-1] if names else ""


def _line_of(text: str, key: str) -> int | None:
    if not key or not text:
        return None
    if key == "[[variant]]":
        pattern = re.escape(key)
    else:
        pattern = rf"(^|[\s{{,]){re.escape(key)}\s*="
    for number, line in enumerate(text.splitlines(), start=1):
        if re.search(pattern, line) or line.strip() == f"[{key}]":
            return number
    return None


def builtin_recipe_path(name: str = "demo") -> Path:
    return Path(__file__).parent / "recipes" / f"{name}.toml"
