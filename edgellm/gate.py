"""CI gate: turn budgets into an exit code. 0 all within budget, 1 a budget broken, 2 bad input.

The torch reference is not gated unless named with --variant: it is the baseline, not a
deliverable. The gate cannot be fooled by a broken report or budget: a figure a budget reads
that is missing, null, not a number, not finite (NaN, ±inf) or impossible (a negative size)
breaks that budget; a budget that is not a finite number >= 0, a budget for a variant the
report does not have, and a report that is not an object with a list of named variants are
bad input.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from xml.etree import ElementTree

from edgellm.artifacts import write_text_atomic
from edgellm.errors import UserError
from edgellm.recipe import REFERENCE
from edgellm.report_file import load_report

LIMITS = ("max-size-mb", "max-ppl-increase-pct", "min-decode-tps", "max-kl")  # Budget's order
# the report figures each budget reads: (key, least sound value, whether that value is excluded)
FIGURES = {
    "max-size-mb": (("size_bytes", 0, False),),
    "max-ppl-increase-pct": (("ppl", 0, True), ("ppl_delta_pct", -100, True)),
    "min-decode-tps": (("decode_tps", 0, False),),
    "max-kl": (("kl_mean", 0, False),),
}
NEEDS_A_BUDGET = ("pass --max-size-mb, --max-ppl-increase-pct, --min-decode-tps, --max-kl or "
                  "--budgets FILE")


@dataclass(frozen=True)
class Budget:
    max_size_mb: float | None = None
    max_ppl_increase_pct: float | None = None
    min_decode_tps: float | None = None
    max_kl: float | None = None  # mean KL divergence from the reference, nats

    def __post_init__(self):
        for flag, value in zip(LIMITS, self.limits(), strict=True):
            if value is not None and (finite(value) is None or value < 0):
                raise UserError(f"budget --{flag} is {shown(value)}: pass a finite number >= 0")

    def is_empty(self) -> bool:
        return all(v is None for v in self.limits())

    def over(self, base: Budget) -> Budget:
        """This budget's limits where it sets them, `base`'s elsewhere."""
        pick = [a if a is not None else b for a, b in zip(self.limits(), base.limits(), strict=True)]
        return Budget(*pick)

    def limits(self) -> tuple:
        return (self.max_size_mb, self.max_ppl_increase_pct, self.min_decode_tps, self.max_kl)


def finite(value) -> float | None:
    """`value` as a float when it is a finite real number (a bool is not), else None."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        return None
    return number if math.isfinite(number) else None


def shown(value) -> str:
    """`value` as JSON, on one line of ASCII and at most 40 characters."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 40 else text[:37] + "..."


def load_budgets(path: Path) -> tuple[Budget, dict[str, Budget]]:
    """A budgets file kept in the repository (TOML): limits for every gated variant at the
    top, per-variant limits under [variant.NAME]:

        max_size_mb = 120
        max_ppl_increase_pct = 10
        [variant.gguf-q4_0]
        max_ppl_increase_pct = 30
    """
    import tomllib

    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    def limit():
        return Field(None, ge=0, allow_inf_nan=False)

    class Limits(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        max_size_mb: float | None = limit()
        max_ppl_increase_pct: float | None = limit()
        min_decode_tps: float | None = limit()
        max_kl: float | None = limit()

    class BudgetsFile(Limits):
        variant: dict[str, Limits] = {}

    path = Path(path)
    if not path.is_file():
        raise UserError(f"budgets file {path} does not exist: fix the path to your budgets TOML")
    try:
        data = BudgetsFile.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"budgets file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot read budgets file {path} ({exc.strerror}): fix its path") from None
    except ValidationError as exc:
        raise UserError(_budgets_error(path, exc.errors()[0])) from None

    def budget(limits: Limits) -> Budget:
        return Budget(limits.max_size_mb, limits.max_ppl_increase_pct, limits.min_decode_tps,
                      limits.max_kl)

    return budget(data), {name: budget(limits) for name, limits in data.variant.items()}


def _budgets_error(path: Path, error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        fix = "the keys are max_size_mb, max_ppl_increase_pct, min_decode_tps, max_kl, [variant.NAME]"
    elif str(error["loc"][-1]).replace("_", "-") in LIMITS:
        fix = "a budget is a finite number >= 0"
    else:
        fix = "[variant.NAME] tables hold limits"
    return f"budgets file {path}: key '{key}': {error['msg']}: {fix}"


@dataclass(frozen=True)
class Breach:
    variant: str
    budget: str
    message: str


def check_budget_names(per_variant: dict[str, Budget], report: dict, report_path: Path,
                       budgets_path: Path | None) -> None:
    """A [variant.NAME] budget for a variant the report lacks is a typo, not a pass."""
    known = [r["name"] for r in report["variants"]]
    skipped = report.get("not_measured")
    known += [r.get("name") for r in skipped if isinstance(r, dict)] if isinstance(skipped, list) else []
    for name in per_variant:
        if name not in known:
            raise UserError(f"budgets file {budgets_path}: [variant.{json.dumps(name)}] names no "
                            f"variant in {report_path}: known variants are {', '.join(map(str, known))}; "
                            "fix the name")


def select_variants(report: dict, names: list[str] | None, path: Path) -> list[dict]:
    rows = report["variants"]
    if not names:
        gated = [r for r in rows if r["name"] != REFERENCE]
        if not gated:
            raise UserError(f"report {path} has only the {REFERENCE}: nothing to gate; pass "
                            f"--variant {REFERENCE} to gate it")
        return gated
    known = {r["name"]: r for r in rows}
    for name in names:
        if name not in known:
            raise UserError(f"variant '{name}' is not in {path}: known variants are "
                            f"{', '.join(known)}")
    return [known[n] for n in dict.fromkeys(names)]


def run_gate(report_path: Path, options: Budget, budgets_path: Path | None = None,
             names: list[str] | None = None, junit: Path | None = None) -> tuple[list[dict], list[Breach]]:
    """The gated rows and their breaches; `options` (the command line's limits) override the
    budgets file's top-level ones. Bad input of any kind raises UserError."""
    budget, per_variant = load_budgets(budgets_path) if budgets_path else (Budget(), {})
    budget = options.over(budget)
    report = load_report(report_path)
    check_budget_names(per_variant, report, report_path, budgets_path)
    rows = select_variants(report, names, report_path)
    if all(_budget_for(row, budget, per_variant).is_empty() for row in rows):
        raise UserError(f"gate needs a budget for {', '.join(r['name'] for r in rows)}: "
                        + NEEDS_A_BUDGET)
    breaches = check(rows, budget, per_variant)
    if junit:
        write_junit(junit, rows, budget, breaches, per_variant)
    return rows, breaches


def check(rows: list[dict], budget: Budget,
          per_variant: dict[str, Budget] | None = None) -> list[Breach]:
    """Every breach of every gated row, at most one per (row, budget); `per_variant` budgets
    override `budget` by name."""
    breaches = []
    for row in rows:
        breaches += _row_breaches(row, _budget_for(row, budget, per_variant))
    return breaches


def _budget_for(row: dict, budget: Budget, per_variant: dict[str, Budget] | None) -> Budget:
    return (per_variant or {}).get(row["name"], Budget()).over(budget)


def _row_breaches(row: dict, budget: Budget) -> list[Breach]:
    breaches = []
    for flag, limit in zip(LIMITS, budget.limits(), strict=True):
        message = None if limit is None else (_unsound(row, flag) or _over(row, flag, limit))
        if message:
            breaches.append(Breach(row["name"], flag, f"{row['name']}: {message}"))
    return breaches


def _unsound(row: dict, flag: str) -> str | None:
    """Why the figures `flag` reads cannot pass it, or None when they are sound numbers."""
    for key, least, excluded in FIGURES[flag]:
        if key not in row:
            hint = " (no KL measured: a report from before edgellm measured it)" if key == "kl_mean" else ""
            return f"{key} missing from the report{hint}: fails {flag}; rerun `edgellm run`"
        number = finite(row[key])
        if number is None or number < least or (excluded and number == least):
            bound = f"> {least}" if excluded else f">= {least}"
            return (f"{key} is {shown(row[key])}, not a finite number {bound}: fails {flag}; "
                    "rerun `edgellm run`")
    return None


def _over(row: dict, flag: str, limit: float) -> str | None:
    """The breach of `limit` by the row's (sound) figure, or None within it."""
    if flag == "max-size-mb":
        size_mb = row["size_bytes"] / 1e6
        return f"size {size_mb:.1f} MB > budget {limit:g} MB" if size_mb > limit else None
    if flag == "max-ppl-increase-pct":
        delta = row["ppl_delta_pct"]
        return f"perplexity +{delta:.2f}% > budget +{limit:g}%" if delta > limit else None
    if flag == "min-decode-tps":
        tps = row["decode_tps"]
        return f"decode {tps:.1f} tok/s < budget {limit:g} tok/s" if tps < limit else None
    kl = row["kl_mean"]
    return f"mean KL divergence {kl:.4f} nats > budget {limit:g}" if kl > limit else None


def write_junit(path: Path, rows: list[dict], budget: Budget, breaches: list[Breach],
                per_variant: dict[str, Budget] | None = None) -> None:
    """One test case per (variant, budget); a breach is a failure with its message."""
    by_case = {(b.variant, b.budget): b for b in breaches}
    suite = ElementTree.Element("testsuite", name="edgellm-gate")
    for row in rows:
        for name in _budget_names(_budget_for(row, budget, per_variant)):
            case = ElementTree.SubElement(suite, "testcase", classname=row["name"], name=name)
            if (row["name"], name) in by_case:
                message = by_case[(row["name"], name)].message
                failure = ElementTree.SubElement(case, "failure", message=message)
                failure.text = message
    suite.set("tests", str(len(suite)))
    suite.set("failures", str(len(suite.findall("testcase/failure"))))
    _write_junit_file(path, suite)


def _budget_names(budget: Budget) -> list[str]:
    return [n for n, v in zip(LIMITS, budget.limits(), strict=True) if v is not None]


def _write_junit_file(path: Path, suite) -> None:
    try:
        write_text_atomic(Path(path), ElementTree.tostring(suite, encoding="unicode") + "\n")
    except OSError as exc:
        raise UserError(f"cannot write JUnit file {path} ({exc.strerror}): choose a writable path") from None
