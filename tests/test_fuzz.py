"""Fuzz the readers of untrusted input with hypothesis: GGUF files (header, metadata, tensor
table) and recipes (TOML text and parsed tables). Whatever the bytes, a reader returns or
raises UserError (one line, exit 2 in the CLI): never another exception, never a hang.

The suite runs a few hundred examples per target; `python bench/fuzz.py --seconds N` runs
the same properties for a time budget.
"""

from __future__ import annotations

import os
import struct
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellm.errors import UserError

EXAMPLES = int(os.environ.get("EDGELLM_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=5000, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# values that break naive readers when written over a length or count
HOSTILE_U64 = [0, 1, 2**31, 2**32 - 1, 2**40, 2**62, 2**64 - 1]


@cache
def small_gguf() -> bytes:
    """A valid GGUF with strings, a string array, a float array and two tensors."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "small.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_string("general.name", "fuzz")
        writer.add_uint32("llama.block_count", 2)
        writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc", "<s>"])
        writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, 0.5])
        writer.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
        writer.add_tensor("output_norm.weight", np.ones(8, np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


@st.composite
def mutated_gguf(draw) -> bytes:
    data = bytearray(small_gguf())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 8))
        if draw(st.booleans()):
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at + 8] = struct.pack("<Q", draw(st.sampled_from(HOSTILE_U64)))
    if draw(st.integers(0, 4)) == 0:
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def read_gguf_like_edgellm(data: bytes) -> None:
    """What edgellm does with a user's .gguf before transformers sees it."""
    from edgellm.models import gguf_metadata, resolve_source

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.gguf"
        path.write_bytes(data)
        try:
            resolve_source(str(path))
            gguf_metadata(path)
        except UserError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)


def fuzzed(strategy, check, **overrides):
    """A test running `check` on examples of `strategy` (bench/fuzz.py builds its own)."""
    return settings(FUZZ, **overrides)(given(strategy)(check))


test_gguf_reader_refuses_or_reads_mutated_files = fuzzed(mutated_gguf(), read_gguf_like_edgellm)


def test_the_unmutated_gguf_reads():
    from edgellm.models import gguf_metadata

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.gguf"
        path.write_bytes(small_gguf())
        assert gguf_metadata(path)["general.name"] == "fuzz"


def test_a_string_array_claiming_2_to_the_40_items_is_refused_at_once(tmp_path):
    """The file that hung gguf-py's reader: found by this fuzz test."""
    from edgellm.gguf_bounds import check_gguf_layout

    data = bytearray(small_gguf())
    at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4
    data[at:at + 8] = struct.pack("<Q", 2**40)  # the array's item count
    path = tmp_path / "crafted.gguf"
    path.write_bytes(bytes(data))
    try:
        check_gguf_layout(path)
    except UserError as exc:
        assert "1099511627776 items" in str(exc)
    else:
        raise AssertionError("crafted GGUF accepted")


VALID_RECIPE = {
    "model": {"source": "smollm2-135m"},
    "eval": {"ctx": 64, "max_tokens": 256},
    "calibration": {"samples": 4, "seqlen": 32},
    "variant": [{"name": "q4", "compress": [{"method": "gptq", "bits": 4}],
                 "export": {"format": "gguf", "weights": "q4_0"}}],
}
scalars = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=12),
                    st.booleans())
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)


@st.composite
def mutated_recipe(draw) -> dict:
    """The valid recipe with some values replaced and keys added at any depth."""
    import copy

    recipe = copy.deepcopy(VALID_RECIPE)
    for _ in range(draw(st.integers(1, 3))):
        table = recipe
        while True:
            keys = list(table) if isinstance(table, dict) else list(range(len(table)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = table[key]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                table = child
                continue
            if isinstance(table, dict) and draw(st.integers(0, 3)) == 0:
                key = draw(st.text(max_size=10))
            table[key] = draw(values)
            break
    return recipe


def _parse_or_user_error(call) -> None:
    try:
        call()
    except UserError as exc:
        assert "\n" not in str(exc)


def check_recipe_table(data: dict) -> None:
    from edgellm.recipe import parse_recipe

    _parse_or_user_error(lambda: parse_recipe(data))


def check_recipe_file(content: str | bytes) -> None:
    from edgellm.recipe import load_recipe

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.toml"
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        else:
            path.write_bytes(content)
        _parse_or_user_error(lambda: load_recipe(path))


any_file = st.one_of(st.text(max_size=400), st.binary(max_size=400))
test_recipe_validation_refuses_or_accepts_mutated_tables = fuzzed(mutated_recipe(),
                                                                  check_recipe_table)
test_recipe_reader_refuses_or_accepts_any_file = fuzzed(any_file, check_recipe_file)

# name: (strategy, property), for bench/fuzz.py
TARGETS = {"gguf file": (mutated_gguf(), read_gguf_like_edgellm),
           "recipe table": (mutated_recipe(), check_recipe_table),
           "recipe file": (any_file, check_recipe_file)}
