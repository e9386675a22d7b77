"""Shared fixtures: a tiny random llama (built in memory, saved as an HF folder with a small
BPE tokenizer trained on the fly) for fast tests, and the shared evaluation data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_TEXT = ("The quick brown fox jumps over the lazy dog. " * 20
             + "Numbers like 12345 and 678 appear in text. Models read tokens. ") * 3


# the rows of a small report the gate tests start from (tests/test_gate*.py)
GATE_ROWS = [
    {"name": "reference", "size_bytes": 538_000_000, "ppl": 20.0, "ppl_delta_pct": 0.0,
     "decode_tps": 12.0},
    {"name": "q8", "size_bytes": 145_000_000, "ppl": 20.1, "ppl_delta_pct": 0.5,
     "decode_tps": 80.0, "kl_mean": 0.002},
    {"name": "q4", "size_bytes": 92_000_000, "ppl": 24.0, "ppl_delta_pct": 20.0,
     "decode_tps": 110.0, "kl_mean": 0.12},
]


def shared_text(name: str = "wikitext-2-raw-test.txt") -> Path:
    path = Path(os.environ.get("EDGELLM_DATA", SHARED_DATA)) / name
    if not path.is_file():
        pytest.fail(f"shared data {path} missing: set EDGELLM_DATA")
    return path


def build_tiny_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TINY_TEXT, shared_text().read_text()[:20000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def build_tiny_llama(folder: Path, seed: int = 0, tie: bool = True, layers: int = 2) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tie,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_theta=10000.0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the init so outputs are not near-uniform
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def load_tensors(folder: Path) -> dict:
    """Every tensor of an HF folder's safetensors files, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `edgellm ARGS` in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout)


def write_tiny_recipe(path: Path, model: Path, variants: str) -> Path:
    """A recipe for fast pipeline tests: `model` scored on 512 tokens in windows of 64, with
    4 × 64 calibration tokens of wikitext-2 valid, and the given [[variant]] tables."""
    path.write_text(f"""
[model]
source = "{model}"
[eval]
max_tokens = 512
ctx = 64
decode_tokens = 4
threads = 1
[calibration]
text = "{shared_text('wikitext-2-valid.txt')}"
samples = 4
seqlen = 64
{variants}
""")
    return path


def gptq_folder(tiny_llama: Path, tmp_path: Path, **options) -> Path:
    """A GPTQ checkpoint of the tiny llama, solved on 4 × 64 calibration tokens."""
    from edgellm.compress import Context, apply_step
    from edgellm.recipe import CalibrationSpec

    dest = tmp_path / "gptq"
    dest.mkdir()
    calibration = CalibrationSpec(text=str(shared_text("wikitext-2-valid.txt")), samples=4, seqlen=64)
    apply_step({"method": "gptq", **options}, tiny_llama, dest, Context(calibration=calibration))
    return dest


@pytest.fixture(scope="module")
def tiny_gptq(tiny_llama, tmp_path_factory) -> Path:
    return gptq_folder(tiny_llama, tmp_path_factory.mktemp("gptq"), grid="q4_0")


def window_nll_of(fmt: str, path: Path) -> float:
    """Mean NLL of one fixed 64-token window of the tiny vocabulary in runtime `fmt`."""
    import numpy as np

    from edgellm.runtimes import open_runtime, window_nll

    runtime = open_runtime(fmt, str(path), 1, 64)
    try:
        return window_nll(runtime, (np.arange(64, dtype=np.int32) * 7) % 250)[0]
    finally:
        runtime.close()


def save_beside(model, source: Path, dest: Path) -> Path:
    """`model` saved as an HF folder at `dest` with `source`'s tokenizer files."""
    model.save_pretrained(dest)
    for extra in source.iterdir():
        if extra.name.startswith("tokenizer") or extra.name == "special_tokens_map.json":
            (dest / extra.name).write_bytes(extra.read_bytes())
    return dest


def halfway_budget_export(model_dir: Path, tmp_path: Path, plan, export, spec,
                          low: str, high: str):
    """A per-matrix budget export of `model_dir` halfway between every matrix in candidate
    `low` and every one in `high` (so the plan must mix them), checked to be a mixture
    within the budget: its artifact, record (allocation.json), budget spec, calibration
    and work folder."""
    import json
    from types import SimpleNamespace

    from edgellm.recipe import CalibrationSpec

    calibration = CalibrationSpec(text="wikitext-2-valid", samples=4, seqlen=64)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    sizes = [plan(model_dir, spec(100, [c]), work, calibration)["predicted_bytes"] for c in (low, high)]
    budget = spec(sum(sizes) / 2 / 1e6, [low, high])
    artifact = export(model_dir, tmp_path / "v" / budget.format, budget, work, calibration)
    record = json.loads((tmp_path / "v" / "allocation.json").read_text())
    assert len(set(record["tensor_types"].values())) == 2  # a mixture
    assert record["written_bytes"] <= record["predicted_bytes"] <= budget.max_size_mb * 1e6
    return SimpleNamespace(artifact=artifact, record=record, budget=budget,
                           calibration=calibration, work=work)
