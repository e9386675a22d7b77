"""The scoring protocol on a tiny random llama: NLL sums match transformers' own loss."""

import math

import numpy as np
import pytest
import torch

from edgellm.runtimes import nll_of_targets, open_runtime, window_nll
from edgellm.runtimes.protocol import perplexity


def test_nll_of_targets_matches_torch_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 50)).astype(np.float32) * 5
    targets = rng.integers(0, 50, size=7)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits),
                                                 torch.from_numpy(targets), reduction="sum")
    assert nll_of_targets(logits, targets) == pytest.approx(float(expected), rel=1e-6)


def test_torch_runtime_scores_like_transformers_loss(tiny_llama):
    from transformers import AutoModelForCausalLM

    window = np.arange(3, 67, dtype=np.int32) % 250
    runtime = open_runtime("torch", str(tiny_llama), threads=1, ctx=64)
    nll, count = window_nll(runtime, window)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.from_numpy(window.astype(np.int64))[None]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert count == 63
    assert nll / count == pytest.approx(float(loss), rel=1e-5)
    assert perplexity(nll, count) == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_torch_generation_with_cache_equals_recompute(tiny_llama):
    from transformers import AutoModelForCausalLM

    prompt = np.arange(5, 21, dtype=np.int32)
    runtime = open_runtime("torch", str(tiny_llama), threads=1, ctx=64)
    cached = runtime.generate(prompt, 8).tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.from_numpy(prompt.astype(np.int64))[None]
    recomputed = []
    with torch.no_grad():
        for _ in range(8):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            recomputed.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert cached == recomputed
