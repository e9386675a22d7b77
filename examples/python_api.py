"""The Python API: the same functions the CLI calls.

    python examples/python_api.py OUT_DIR
"""

import sys
from pathlib import Path

from edgellm.gate import Budget, check
from edgellm.pipeline import run_recipe
from edgellm.recipe import parse_recipe

recipe = parse_recipe({
    "model": {"source": "smollm2-135m"},
    "eval": {"text": "wikitext-2-raw-test", "max_tokens": 4096, "ctx": 512},
    "variant": [{"name": "q8", "export": {"format": "gguf", "weights": "q8_0"}},
                {"name": "q4", "export": {"format": "gguf", "weights": "q4_k_m"}}],
})
report = run_recipe(recipe, Path(sys.argv[1] if len(sys.argv) > 1 else "api-out"))
for row in report["variants"]:
    print(f"{row['name']:10} {row['size_mb']:7.1f} MB  ppl {row['ppl']:.3f} "
          f"({row['ppl_delta_pct']:+.2f}%)  decode {row['decode_tps']:.1f} tok/s")
breaches = check([r for r in report["variants"] if r["name"] != "reference"],
                 Budget(max_size_mb=120))
print("\n".join(b.message for b in breaches) or "all within 120 MB")
