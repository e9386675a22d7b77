"""Accuracy beyond perplexity: how far a variant's next-token distributions are from the
reference's, on the same token ids (what llama.cpp's perplexity tool reports with
`--kl-divergence`).

Storing the reference's full distributions would take vocabulary × positions floats (3 GB
for 16,384 positions of SmolLM2), so each position keeps: the top-k token ids and their
log-probabilities, the log of the mass outside them, and S tokens sampled from that
outside mass (with their log-probabilities). KL(P_ref || Q) is then the exact sum over the
top k plus an unbiased Monte Carlo estimate of the tail's share, p_tail × mean over the
samples of (log p − log q). Merging the tail into one bucket instead would only give a
lower bound, and a loose one: 70% of the full KL at k = 32 and still 92% at k = 512 on
SmolLM2 (README). With k = 32 and S = 32, 16,384 positions take 8 MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOP_K = 32
TAIL_SAMPLES = 32


@dataclass
class TopK:
    """The reference's next-token distribution at each scored position, summarized."""

    ids: np.ndarray  # int32 [positions, k], most likely first
    logprobs: np.ndarray  # float32 [positions, k]
    rest: np.ndarray  # float32 [positions], log of the mass outside the top k
    tail_ids: np.ndarray  # int32 [positions, S], sampled from the mass outside the top k
    tail_logprobs: np.ndarray  # float32 [positions, S], their log-probabilities

    FIELDS = ("ids", "logprobs", "rest", "tail_ids", "tail_logprobs")

    def save(self, path: Path) -> None:
        from edgellm.artifacts import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, **{f: getattr(self, f) for f in self.FIELDS})

    @classmethod
    def load(cls, path: Path) -> TopK:
        with np.load(path) as data:
            return cls(*(data[f] for f in cls.FIELDS))

    @classmethod
    def concat(cls, parts: list[TopK]) -> TopK:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS))

    def window(self, start: int, count: int) -> TopK:
        return TopK(*(getattr(self, f)[start:start + count] for f in self.FIELDS))


def log_normalizer(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp of float32 logits, in float64. Exponentials in float32 (after the
    max is subtracted they lie in [0, 1]), sums in float64: 17× faster than all-float64 on a
    512×49152 window, and equal to it within 1e-9 relative."""
    peak = logits.max(axis=1, keepdims=True)
    sums = np.exp(logits - peak).sum(axis=1, dtype=np.float64)
    return np.log(sums) + peak[:, 0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of float32 logits."""
    return (logits - log_normalizer(logits)[:, None]).astype(np.float32)


def top_k(logits: np.ndarray, k: int = TOP_K, samples: int = TAIL_SAMPLES,
          seed: int = 0) -> TopK:
    """The summary of one window's logits [positions, vocab]; the tail samples are drawn
    with a fixed seed, so a rerun stores the same file."""
    k = min(k, logits.shape[1])
    logp = log_softmax(logits)
    ids = np.argpartition(-logp, k - 1, axis=1)[:, :k]
    rows = np.arange(len(logp))[:, None]
    order = np.argsort(-logp[rows, ids], axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    kept = logp[rows, ids]
    tail_ids, tail_mass = _sample_tail(logp, ids, samples, np.random.default_rng(seed))
    rest = np.log(np.clip(tail_mass, 1e-30, None)).astype(np.float32)
    return TopK(ids.astype(np.int32), kept, rest, tail_ids, logp[rows, tail_ids])


def _sample_tail(logp: np.ndarray, top_ids: np.ndarray, samples: int,
                 rng) -> tuple[np.ndarray, np.ndarray]:
    """`samples` token ids per row drawn (with replacement) from the distribution outside
    the row's top-k ids, and that tail's probability mass (summed directly, not as 1 minus
    the top k, which loses precision when the top k hold nearly everything). Rows whose
    tail is empty repeat their last top-k id, at weight 0."""
    out = np.empty((len(logp), samples), dtype=np.int32)
    mass = np.zeros(len(logp))
    for row in range(len(logp)):
        probs = np.exp(logp[row].astype(np.float64))
        probs[top_ids[row]] = 0.0
        cdf = np.cumsum(probs)
        mass[row] = cdf[-1]
        if cdf[-1] <= 0:
            out[row] = top_ids[row, -1]
            continue
        draws = rng.random(samples) * cdf[-1]
        out[row] = np.minimum(np.searchsorted(cdf, draws, side="right"), len(cdf) - 1)
    return out, mass


def divergence(reference: TopK, logits: np.ndarray,
               log_norm: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per position: KL(P_ref || Q), exact over the reference's top k plus the sampled
    estimate of the tail, and whether Q's most likely token is the reference's. Only the
    log-probabilities of the reference's ids are formed (`log_norm`: the rows'
    log-sum-exp, when the caller has it), not the whole [positions, vocab] log-softmax."""
    log_norm = log_normalizer(logits) if log_norm is None else log_norm
    rows = np.arange(len(logits))[:, None]

    def logq(ids: np.ndarray) -> np.ndarray:  # rounded as log_softmax rounds: identical
        # logits give the reference's own log-probabilities, and a KL of exactly 0
        return (logits[rows, ids] - log_norm[:, None]).astype(np.float32).astype(np.float64)

    p_kept = reference.logprobs.astype(np.float64)
    head = (np.exp(p_kept) * (p_kept - logq(reference.ids))).sum(axis=1)
    p_tail = np.exp(reference.rest.astype(np.float64))
    log_ratio = reference.tail_logprobs.astype(np.float64) - logq(reference.tail_ids)
    kl = head + p_tail * log_ratio.mean(axis=1)
    agree = logits.argmax(axis=1) == reference.ids[:, 0]
    return kl, agree


def summarize(kl: np.ndarray, agree: np.ndarray) -> dict:
    """The report's numbers: mean and 99th-percentile KL (nats), top-1 agreement. Where the
    true KL is tiny (an f16 export), sampling noise can take the mean below zero; the true
    value cannot be, so the mean is raised to zero then (which only moves it closer). Single
    positions are left unbiased: raising each to zero would bias the mean upward (1.13× on
    SmolLM2 q8_0)."""
    return {"kl_mean": max(float(kl.mean()), 0.0), "kl_p99": float(np.percentile(kl, 99)),
            "kl_max": float(kl.max()), "top1_agreement": float(agree.mean())}
