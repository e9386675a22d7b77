"""KL divergence from the reference's top-k log-probabilities, and top-1 agreement."""

import numpy as np
import torch

from edgellm.divergence import TopK, divergence, summarize, top_k


def full_kl(ref_logits, logits) -> np.ndarray:
    p = torch.log_softmax(torch.from_numpy(ref_logits).double(), dim=1)
    q = torch.log_softmax(torch.from_numpy(logits).double(), dim=1)
    return (p.exp() * (p - q)).sum(dim=1).numpy()


def random_logits(rows=64, vocab=300, scale=4.0, seed=0):
    return (np.random.default_rng(seed).standard_normal((rows, vocab)) * scale).astype(np.float32)


def test_the_reference_against_itself_is_zero_and_agrees_everywhere():
    logits = random_logits()
    kl, agree = divergence(top_k(logits), logits)
    assert np.all(kl == 0.0) and agree.all()
    assert summarize(kl, agree) == {"kl_mean": 0.0, "kl_p99": 0.0, "kl_max": 0.0,
                                    "top1_agreement": 1.0}


def test_with_the_whole_vocabulary_it_is_the_full_kl():
    ref, other = random_logits(), random_logits(seed=1)
    kl, _ = divergence(top_k(ref, k=300), other)
    np.testing.assert_allclose(kl, full_kl(ref, other), rtol=1e-4)


def test_the_sampled_tail_makes_the_estimate_unbiased():
    ref = random_logits(rows=512, vocab=2000, scale=2.0)  # a heavy tail beyond the top 32
    noisy = ref + random_logits(rows=512, vocab=2000, seed=2, scale=0.5)
    exact = full_kl(ref, noisy).mean()
    kl, _ = divergence(top_k(ref, k=32), noisy)
    assert abs(kl.mean() / exact - 1) < 0.03
    assert np.exp(top_k(ref, k=32).rest).mean() > 0.5  # most of the mass is in the tail


def test_more_noise_gives_more_divergence_and_less_agreement():
    ref = random_logits(scale=6.0)
    stats = top_k(ref)
    results = [summarize(*divergence(stats, ref + random_logits(seed=3, scale=s)))
               for s in (0.1, 0.5, 2.0)]
    kls = [r["kl_mean"] for r in results]
    agreement = [r["top1_agreement"] for r in results]
    assert kls[0] < kls[1] < kls[2]
    assert agreement[0] >= agreement[1] >= agreement[2] and agreement[2] < 1.0


def test_top_k_is_sorted_and_saves_and_loads(tmp_path):
    logits = random_logits(rows=8)
    stats = top_k(logits, k=5)
    assert np.all(np.diff(stats.logprobs, axis=1) <= 0)
    np.testing.assert_array_equal(stats.ids[:, 0], logits.argmax(axis=1))
    total = np.exp(stats.logprobs.astype(np.float64)).sum(axis=1) + np.exp(stats.rest)
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)
    assert stats.tail_ids.shape == (8, 32)
    assert not any(np.isin(tail, top).any() for tail, top in zip(stats.tail_ids, stats.ids, strict=True))
    np.testing.assert_array_equal(top_k(logits, k=5).tail_ids, stats.tail_ids)  # fixed seed
    stats.save(tmp_path / "ref.npz")
    loaded = TopK.load(tmp_path / "ref.npz")
    both = TopK.concat([loaded, loaded]).window(8, 8)
    for field in TopK.FIELDS:
        np.testing.assert_array_equal(getattr(both, field), getattr(stats, field))


def test_a_mean_below_zero_from_sampling_noise_is_reported_as_zero():
    kl = np.array([-3e-6, 1e-6, 0.5e-6])
    summary = summarize(kl, np.ones(3, dtype=bool))
    assert summary["kl_mean"] == 0.0 and summary["kl_max"] == 1e-6
