"""Sampling: one owner of how a next token is chosen from logits, for plain and speculative
decoding. Greedy is argmax; otherwise temperature, then top-k, then
top-p (nucleus) over the candidates ranked most likely first (among equals the lower id), one
uniform draw per token from numpy's Generator."""

from __future__ import annotations

import numpy as np

from dsv3_export.core.errors import ExportError


def check_generation_args(*, max_new_tokens: int = 1, temperature: float = 0.0, top_k: int = 0,
                          top_p: float = 1.0) -> None:
    """ExportError for a bad generation setting (the CLI calls this before loading a build)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ExportError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ExportError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ExportError(f"top_k must be >= 0 (0 = no limit), got {top_k}")
    if not 0 < top_p <= 1:
        raise ExportError(f"top_p must be in (0, 1], got {top_p}")


def ranked_probs(logits: np.ndarray, *, temperature: float, top_k: int = 0,
                 top_p: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(candidates [B, n], their probabilities [B, n]) of sampling from logits [B, V] (float64):
    most likely first, among equals the lower id (as argmax, so top_k=1 is greedy); softmax of
    logits / temperature over the top_k most likely (0: all), then zero beyond the smallest set
    whose probability reaches top_p (nucleus), renormalized."""
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        cand = np.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k]
        vals = np.take_along_axis(logits, cand, -1)
        cand = np.take_along_axis(cand, np.lexsort((cand, -vals), axis=-1), -1)
    else:
        cand = np.argsort(-logits, axis=-1, kind="stable")
    z = np.take_along_axis(logits, cand, -1) / temperature
    probs = np.exp(z - z[:, :1])
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        before = np.cumsum(probs, -1) - probs  # mass of the more likely candidates
        probs = np.where(before < top_p, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return cand, probs


class NonFiniteLogits(ExportError):
    """The model produced NaN or Inf logits: damaged weights or build, never a token to emit."""


def check_finite(logits: np.ndarray) -> None:
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).sum())
        raise NonFiniteLogits(f"the model produced {bad} non-finite logits (NaN or Inf) instead of a next-token "
                              "distribution: its weights or the build are damaged (dsv3-export verify BUILD says where)")


def sample(logits: np.ndarray, rng: np.random.Generator | None, *, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> np.ndarray:
    """Next tokens [B] from last-position logits [B, V]: argmax when temperature == 0; otherwise one
    draw per row (one uniform each, with `rng`) from `ranked_probs`. Non-finite logits raise
    NonFiniteLogits (argmax of NaN would quietly emit token 0)."""
    check_finite(logits)
    if temperature == 0:
        return logits.argmax(-1)
    cand, probs = ranked_probs(logits.astype(np.float64, copy=False), temperature=temperature, top_k=top_k,
                               top_p=top_p)
    batch = cand.shape[0]
    cum = np.cumsum(probs, -1)
    u = rng.random(batch)[:, None] * cum[:, -1:]
    pick = np.minimum((cum <= u).sum(-1), cand.shape[1] - 1)
    # Never land on a zero-probability tail entry through rounding.
    pick = np.minimum(pick, (probs > 0).sum(-1) - 1)
    return cand[np.arange(batch), pick]


def processed_probs(logits: np.ndarray, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution `sample` draws from, over the whole vocabulary: float64
    [..., V], zero outside the top-k / nucleus set. Same candidate order and tie-breaking as
    `sample` (most likely first, among equals the lower id), so the two agree (up to which of
    several exactly equal logits at the top-k boundary is kept)."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        raise ValueError("processed_probs is for sampling (temperature > 0); greedy needs no distribution")
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])
    rows, vocab = flat.shape
    if (not top_k or top_k >= vocab) and top_p >= 1.0:  # plain softmax: no order needed
        z = flat / temperature
        probs = np.exp(z - z.max(-1, keepdims=True))
        return (probs / probs.sum(-1, keepdims=True)).reshape(shape)
    order, probs = ranked_probs(flat, temperature=temperature, top_k=top_k, top_p=top_p)
    out = np.zeros_like(flat)
    np.put_along_axis(out, order, probs, -1)
    return out.reshape(shape)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a distribution [V] (inverse CDF, one uniform); never a zero-probability id."""
    cum = np.cumsum(probs)
    u = rng.random() * cum[-1]
    i = int(np.searchsorted(cum, u, side="right"))
    i = min(i, len(probs) - 1)
    if probs[i] <= 0:  # rounding at the very top of the CDF: the last id with mass
        i = int(np.flatnonzero(probs > 0)[-1])
    return i
