#!/usr/bin/env bash
# A CI step: build and measure a recipe, then fail the job when a variant breaks a budget.
# Exit codes of `edgellm gate`: 0 within budget, 1 a budget broken, 2 bad input.
set -euo pipefail
RECIPE=${1:-examples/recipes/gguf-all-types.toml}
OUT=${OUT:-ci-out}
edgellm run "$RECIPE" --out "$OUT"
edgellm gate "$OUT/report.json" --max-size-mb 150 --max-ppl-increase-pct 10 \
    --junit "$OUT/gate-junit.xml"
