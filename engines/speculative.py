"""MTP self-speculative decoding: the pieces that are pure math, and the measurement bench uses.

DeepSeek-V3's MTP module predicts token t+2 from the main model's final-normed hidden state h_t and
token t+1. Used as a draft, one main-graph call of two tokens confirms up to two tokens
(engines.runtime.Engine._generate_speculative runs the loop; docs/speculative.md explains it).

- Greedy: the draft is accepted when it equals the main model's argmax, so the output is the plain
  greedy output token for token.
- Sampling: standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023). With p the
  main model's and q the draft's distribution *after* the same temperature / top-k / top-p
  processing as plain sampling (`processed_probs`), a draft x ~ q is kept with probability
  min(1, p(x)/q(x)); otherwise the token is drawn from normalize(max(0, p − q)). The emitted
  token is then distributed exactly as p (`verify_draft`), so speculation changes the speed, never
  the output distribution.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from .runtime import ranked_probs


def processed_probs(logits: np.ndarray, *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The distribution `engines.runtime.sample` draws from, over the whole vocabulary: float64
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


def verify_draft(p: np.ndarray, q: np.ndarray, draft: int, rng: np.random.Generator) -> tuple[bool, int]:
    """Speculative sampling for one drafted token: (accepted, token). `draft` was drawn from q; the
    returned token is distributed as p whatever q is. Accept with probability min(1, p/q) at the
    draft; on rejection draw from the residual normalize(max(0, p − q))."""
    pd, qd = float(p[draft]), float(q[draft])
    if qd <= 0:  # cannot happen for a draft drawn from q; treat as a miss
        return False, draw(p, rng)
    if pd >= qd or rng.random() < pd / qd:
        return True, int(draft)
    residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if total <= 0:  # p == q up to rounding: a rejection had probability ~0; p itself is exact
        return False, draw(p, rng)
    return False, draw(residual / total, rng)


# ---- measurement ------------------------------------------------------------------------------------
def measure(engine, prompts: Sequence[Any], *, max_new_tokens: int = 128, temperature: float = 0.0,
            top_k: int = 0, top_p: float = 1.0, seed: int = 0, repeats: int = 1, warmup: bool = True) -> dict:
    """Plain vs speculative decoding on one engine, prompt by prompt (batch 1), interleaved so that
    machine load hits both alike. Returns decode tokens/s of each (total decode tokens over total
    decode seconds, and the median over runs), the speedup, MTP acceptance rate, mean tokens per
    main-graph step, and whether the greedy outputs are equal. What `dsv3-export bench` reports."""
    if engine.mtp_session is None:
        from exporter.errors import ExportError

        raise ExportError(f"{engine.build_dir}: this build has no mtp.onnx; speculative decoding needs the MTP graph")
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    if warmup and prompts:
        engine.generate(prompts[0], **{**kw, "max_new_tokens": min(8, max_new_tokens)}, seed=seed)
        engine.generate(prompts[0], **{**kw, "max_new_tokens": min(8, max_new_tokens)}, seed=seed, speculative=True)
    runs = {"plain": [], "speculative": []}
    equal = True
    drafted = accepted = 0
    spec_steps = spec_tokens = 0
    t0 = time.perf_counter()
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            s = seed + i + r * len(prompts)
            order = ("plain", "speculative") if (i + r) % 2 == 0 else ("speculative", "plain")
            got = {}
            for mode in order:
                got[mode] = engine.generate(prompt, **kw, seed=s, speculative=mode == "speculative")
                runs[mode].append(got[mode].stats)
            st = got["speculative"].stats
            drafted += st.drafted_tokens or 0
            accepted += st.accepted_tokens or 0
            spec_steps += st.steps
            spec_tokens += max(st.new_tokens - 1, 0)
            if temperature == 0 and got["plain"].ids != got["speculative"].ids:
                equal = False

    def rate(stats) -> dict:
        toks = sum(max(s.new_tokens - s.batch, 0) for s in stats if s.steps)
        secs = sum(s.decode_seconds for s in stats if s.steps)
        per_run = [s.decode_tokens_per_s for s in stats if s.decode_tokens_per_s]
        return {"decode_tokens": toks, "decode_seconds": round(secs, 4),
                "tokens_per_s": toks / secs if secs > 0 else None,
                "median_tokens_per_s": float(np.median(per_run)) if per_run else None}

    plain, spec = rate(runs["plain"]), rate(runs["speculative"])
    speedup = (spec["tokens_per_s"] / plain["tokens_per_s"]
               if spec["tokens_per_s"] and plain["tokens_per_s"] else None)
    return {
        "prompts": len(prompts), "repeats": repeats, "max_new_tokens": max_new_tokens,
        "temperature": temperature, "top_k": top_k, "top_p": top_p,
        "plain": plain, "speculative": spec, "speedup": speedup,
        "acceptance_rate": accepted / drafted if drafted else None,
        "tokens_per_step": spec_tokens / spec_steps if spec_steps else None,
        "greedy_equal": equal if temperature == 0 else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
