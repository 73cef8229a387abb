"""MTP self-speculative decoding (batch 1; docs/speculative.md).

DeepSeek-V3's MTP module predicts token t+2 from the main model's final-normed hidden state h_t and
token t+1. Used as a draft, one main-graph call of two tokens confirms up to two tokens.

- Greedy: the draft is accepted when it equals the main model's argmax, so the output is the plain
  greedy output token for token.
- Sampling: standard speculative sampling (Leviathan et al. 2023; Chen et al. 2023). With p the
  main model's and q the draft's distribution *after* the same temperature / top-k / top-p
  processing as plain sampling (`engines.sampling.processed_probs`), a draft x ~ q is kept with
  probability min(1, p(x)/q(x)); otherwise the token is drawn from normalize(max(0, p − q)). The
  emitted token is then distributed exactly as p (`accept_draft`), so speculation changes the
  speed, never the output distribution.

`decode` runs the loop over any `model` with the engine's graph calls: `step(ids, past)` (main
graph: logits, hidden states, present latents), `mtp_step(ids, hidden, past)` (MTP graph: draft
logits, present MTP latent), `empty_past(batch)` and `empty_mtp_past(batch)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dsv3_export.engines.sampling import SamplingParams, check_finite, draw, processed_probs


def accept_draft(p: np.ndarray, q: np.ndarray, draft: int, rng: np.random.Generator) -> tuple[bool, int]:
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


@dataclass
class SpeculativeRun:
    """What one speculative generation did: the tokens, the times, the main-graph decode calls and
    how many drafts were checked and accepted."""

    tokens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def tokens_per_step(self) -> float | None:
        """Tokens from decode steps (all but the prefill's) per main-graph decode call."""
        return (len(self.tokens) - 1) / self.steps if self.steps else None


class _Picker:
    """Greedy argmax, or a draw from the processed distribution with the run's own generator."""

    def __init__(self, params: SamplingParams):
        self.greedy = params.greedy
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def dist(self, logits: np.ndarray) -> np.ndarray:
        return processed_probs(logits, self.params)

    def __call__(self, logits: np.ndarray) -> int:
        check_finite(logits)
        return int(logits.argmax()) if self.greedy else draw(self.dist(logits), self.rng)

    def check(self, draft_logits: np.ndarray) -> tuple[int, Callable[[np.ndarray], tuple]]:
        """(draft, verdict(main logits at the draft's position) -> (accepted, token))."""
        if self.greedy:
            draft = int(draft_logits.argmax())

            def verdict(main):
                check_finite(main)
                return int(main.argmax()) == draft, int(main.argmax())

            return draft, verdict
        q = self.dist(draft_logits)
        draft = draw(q, self.rng)
        return draft, lambda main: accept_draft(self.dist(main), q, draft, self.rng)


def decode(model: Any, ids: np.ndarray, params: SamplingParams,
           on_token: Callable[[int, int], Any] | None = None) -> SpeculativeRun:
    """Generate from one prompt ids [1, P] with MTP drafts, sampling as `params` says (its `stop`
    ids end it, emitted; at most its max_tokens).

    State between steps, with n tokens known (prompt + emitted) and x_{n-1} the newest: the main
    cache holds rows 0..n-2 (x_{n-1} not fed yet), the MTP cache rows 0..n-2 (row j made from h_j
    and x_{j+1}), and the newest MTP logits draft x_n. A step feeds [x_{n-1}, draft] to the main
    graph (positions n-1, n): its logits at n-1 decide x_n, those at n give a bonus x_{n+1} when
    the draft is accepted. On accept both new main rows stay and the MTP runs on (h_{n-1}, x_n),
    (h_n, x_{n+1}); on reject the main row of the draft is cut off (the cache is plain arrays:
    slicing is the rollback) and the MTP runs on (h_{n-1}, x_n) alone."""
    pick = _Picker(params)
    run = SpeculativeRun()
    stops, max_new_tokens = params.stop, params.max_tokens

    def emit(tok: int) -> bool:
        """Record a token; True when generation is over (stop token, length, or on_token said so)."""
        run.tokens.append(tok)
        ended = on_token is not None and on_token(0, tok) is True
        return ended or tok in stops or len(run.tokens) >= max_new_tokens

    t0 = time.perf_counter()
    logits, hidden, past = model.step(ids, model.empty_past(1))
    x = pick(logits[0, -1])
    finished = emit(x)
    if not finished:
        # MTP over the prompt: rows j = 0..P-1 from (h_j, x_{j+1}), x_P being the token just chosen.
        mtp_logits, mtp_past = model.mtp_step(np.concatenate([ids[:, 1:], [[x]]], axis=1), hidden,
                                              model.empty_mtp_past(1))
    run.prefill_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    while not finished:
        if max_new_tokens - len(run.tokens) == 1:  # one token left: a plain step, nothing to draft
            logits, hidden, past = model.step(np.array([[x]], np.int64), past)
            run.steps += 1
            emit(pick(logits[0, -1]))
            break
        draft, verdict = pick.check(mtp_logits[0, -1])
        logits, hidden, past = model.step(np.array([[x, draft]], np.int64), past)
        run.steps += 1
        run.drafted += 1
        ok, token = verdict(logits[0, 0])
        if ok:
            run.accepted += 1
            if emit(draft):
                break
            bonus = pick(logits[0, 1])
            if emit(bonus):
                break
            mtp_logits, mtp_past = model.mtp_step(np.array([[draft, bonus]], np.int64), hidden, mtp_past)
            x = bonus
        else:
            past = [p[:, :-1] for p in past]  # roll back the rejected draft's row
            if emit(token):
                break
            mtp_logits, mtp_past = model.mtp_step(np.array([[token]], np.int64), hidden[:, :1], mtp_past)
            x = token
    run.decode_seconds = time.perf_counter() - t1 if run.steps else 0.0
    return run
