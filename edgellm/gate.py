"""CI gate: turn budgets into an exit code. 0 all within budget, 1 a budget broken, 2 bad input.

The torch reference is not gated unless named with --variant: it is the baseline, not a
deliverable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from edgellm.artifacts import write_text_atomic
from edgellm.errors import UserError
from edgellm.recipe import REFERENCE

REQUIRED_KEYS = ("name", "size_bytes", "ppl", "ppl_delta_pct", "decode_tps")


@dataclass(frozen=True)
class Budget:
    max_size_mb: float | None = None
    max_ppl_increase_pct: float | None = None
    min_decode_tps: float | None = None
    max_kl: float | None = None  # mean KL divergence from the reference, nats

    def is_empty(self) -> bool:
        return all(v is None for v in self.limits())

    def over(self, base: Budget) -> Budget:
        """This budget's limits where it sets them, `base`'s elsewhere."""
        pick = [a if a is not None else b for a, b in zip(self.limits(), base.limits(), strict=True)]
        return Budget(*pick)

    def limits(self) -> tuple:
        return (self.max_size_mb, self.max_ppl_increase_pct, self.min_decode_tps, self.max_kl)


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

    class Limits(BaseModel):
        model_config = ConfigDict(extra="forbid")
        max_size_mb: float | None = Field(None, ge=0)
        max_ppl_increase_pct: float | None = None
        min_decode_tps: float | None = Field(None, ge=0)
        max_kl: float | None = Field(None, ge=0)

    class BudgetsFile(Limits):
        variant: dict[str, Limits] = {}

    path = Path(path)
    if not path.is_file():
        raise UserError(f"budgets file {path} does not exist: fix the path to your budgets TOML")
    try:
        data = BudgetsFile.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"budgets file {path} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(part) for part in error["loc"])
        raise UserError(f"budgets file {path}: key '{key}': {error['msg']}") from None

    def budget(limits: Limits) -> Budget:
        return Budget(limits.max_size_mb, limits.max_ppl_increase_pct, limits.min_decode_tps,
                      limits.max_kl)

    return budget(data), {name: budget(limits) for name, limits in data.variant.items()}


@dataclass(frozen=True)
class Breach:
    variant: str
    budget: str
    message: str


def load_report(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"report {path} does not exist: run `edgellm run` first or fix the path")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"report {path} is not valid JSON: pass the report.json a run wrote") from None
    variants = report.get("variants") if isinstance(report, dict) else None
    if not isinstance(variants, list) or not variants:
        raise UserError(f"report {path} has no variants: pass the report.json a run wrote")
    for row in variants:
        missing = [k for k in REQUIRED_KEYS if not isinstance(row, dict) or k not in row]
        if missing:
            raise UserError(f"report {path}: a variant lacks {', '.join(missing)}: "
                            "regenerate it with `edgellm run`")
    return report


def select_variants(report: dict, names: list[str] | None, path: Path) -> list[dict]:
    rows = report["variants"]
    if not names:
        return [r for r in rows if r["name"] != REFERENCE]
    known = {r["name"]: r for r in rows}
    for name in names:
        if name not in known:
            raise UserError(f"variant '{name}' is not in {path}: known variants are "
                            f"{', '.join(known)}")
    return [known[n] for n in names]


def check(rows: list[dict], budget: Budget,
          per_variant: dict[str, Budget] | None = None) -> list[Breach]:
    """Every breach of every gated row; `per_variant` budgets override `budget` by name."""
    breaches = []
    for row in rows:
        budget_here = (per_variant or {}).get(row["name"], Budget()).over(budget)
        breaches += _row_breaches(row, budget_here)
    return breaches


def _row_breaches(row: dict, budget: Budget) -> list[Breach]:
    breaches = []
    name, size_mb = row["name"], row["size_bytes"] / 1e6
    if budget.max_size_mb is not None and size_mb > budget.max_size_mb:
        breaches.append(Breach(name, "max-size-mb",
                               f"{name}: size {size_mb:.1f} MB > budget {budget.max_size_mb:g} MB"))
    delta = row["ppl_delta_pct"]
    if budget.max_ppl_increase_pct is not None and delta > budget.max_ppl_increase_pct:
        breaches.append(Breach(name, "max-ppl-increase-pct",
                               f"{name}: perplexity +{delta:.2f}% > budget "
                               f"+{budget.max_ppl_increase_pct:g}%"))
    tps = row["decode_tps"]
    if budget.min_decode_tps is not None and (tps is None or tps < budget.min_decode_tps):
        breaches.append(Breach(name, "min-decode-tps",
                               f"{name}: decode {tps or 0:.1f} tok/s < budget "
                               f"{budget.min_decode_tps:g} tok/s"))
    kl = row.get("kl_mean")
    if budget.max_kl is not None and (kl is None or kl > budget.max_kl):
        measured = "no KL measured (a report from before edgellm measured it: rerun)" \
            if kl is None else f"mean KL divergence {kl:.4f} nats"
        breaches.append(Breach(name, "max-kl", f"{name}: {measured} > budget {budget.max_kl:g}"))
    return breaches


def write_junit(path: Path, rows: list[dict], budget: Budget, breaches: list[Breach],
                per_variant: dict[str, Budget] | None = None) -> None:
    """One test case per (variant, budget); a breach is a failure with its message."""
    by_case = {(b.variant, b.budget): b for b in breaches}
    cases = [(row, _budget_names((per_variant or {}).get(row["name"], Budget()).over(budget)))
             for row in rows]
    suite = ElementTree.Element("testsuite", name="edgellm-gate",
                                tests=str(sum(len(names) for _, names in cases)),
                                failures=str(len(breaches)))
    for row, names in cases:
        for name in names:
            case = ElementTree.SubElement(suite, "testcase", classname=row["name"], name=name)
            if (row["name"], name) in by_case:
                message = by_case[(row["name"], name)].message
                failure = ElementTree.SubElement(case, "failure", message=message)
                failure.text = message
    _write_junit_file(path, suite)


def _budget_names(budget: Budget) -> list[str]:
    return [n for n, v in zip(("max-size-mb", "max-ppl-increase-pct", "min-decode-tps", "max-kl"),
                              budget.limits(), strict=True) if v is not None]


def _write_junit_file(path: Path, suite) -> None:
    try:
        write_text_atomic(Path(path), ElementTree.tostring(suite, encoding="unicode") + "\n")
    except OSError as exc:
        raise UserError(f"cannot write JUnit file {path} ({exc.strerror}): choose a writable path") from None
