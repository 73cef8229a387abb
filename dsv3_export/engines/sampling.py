"""Sampling: the one owner of a request's sampling fields (`SamplingParams`) and of how a next
token is chosen from logits, for plain, batched and speculative decoding.

Greedy is argmax. Otherwise, over the candidates ranked most likely first (among equals the lower
id): temperature, then top-k, then min-p (drop what is less likely than min_p x the most likely),
then top-p (nucleus), one uniform draw per token from the request's own numpy Generator.

Every surface (the CLI's `run`, `Engine.generate`, the OpenAI server, the Triton model) maps its
own spelling of the fields onto `SamplingParams`, which checks itself and names the bad field in a
`SamplingError`; each surface turns that into its own error (a 400 naming `param` on the server).
A field marked `wire` is taken from clients by name on every surface: adding one is adding it here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from dsv3_export.core.errors import ExportError

# A temperature below this samples as greedy: logits / 1e-308 overflow to inf and the
# probabilities to NaN, and at 1e-5 the most likely token already holds all the mass that float64
# can tell apart from it.
GREEDY_BELOW = 1e-5
MAX_SEED = 2**63 - 1  # numpy's generators take non-negative seeds


class SamplingError(ExportError):
    """A bad sampling field: `param` names it (the server's 400 names it too)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _wire(help_text: str, **extra) -> dict:
    return {"wire": True, "help": help_text, **extra}


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it ends. Checks itself on construction (SamplingError naming
    the field). `seed` seeds the request's own generator, so its tokens do not depend on what else
    shares the batch. `stop`: token ids that end it (emitted, not part of the text); `logprobs`:
    None for none, else the chosen token's log-probability and this many most likely alternatives
    travel with each token."""

    max_tokens: int = field(default=64, metadata=_wire("New tokens at most.", low=1))
    temperature: float = field(default=0.0, metadata=_wire(
        f"0 = greedy (as is anything below {GREEDY_BELOW:g}); higher is more random.", low=0.0, note=" (0 = greedy)"))
    top_k: int = field(default=0, metadata=_wire("Sample from the K most likely only (0 or -1 = all).", low=0,
                                                         note=" (0 or -1 = no limit)"))
    top_p: float = field(default=1.0, metadata=_wire("Nucleus: the most likely tokens holding this much mass."))
    min_p: float = field(default=0.0, metadata=_wire(
        "Drop tokens less likely than MIN_P x the most likely one's probability (0 = off).", low=0.0, high=1.0))
    seed: int = field(default=0, metadata=_wire("Seed of this request's random generator.", low=0, high=MAX_SEED))
    repetition_penalty: float = field(default=1.0, metadata=_wire(
        "Logits of tokens already in the prompt or the output: positive ones divided by this, negative ones "
        "multiplied (above 1: less repetition; 1 = off).", low=0.0, low_open=True))
    presence_penalty: float = field(default=0.0, metadata=_wire(
        "Subtracted from the logit of every token already in the output (0 = off).", low=-2.0, high=2.0))
    frequency_penalty: float = field(default=0.0, metadata=_wire(
        "Subtracted, times its count in the output, from each token's logit (0 = off).", low=-2.0, high=2.0))
    stop: frozenset[int] = frozenset()
    logprobs: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.metadata.get("wire"):
                object.__setattr__(self, f.name, _checked(f, getattr(self, f.name)))
        if self.top_k == -1:  # vLLM's and llama.cpp's spelling of "no limit"
            object.__setattr__(self, "top_k", 0)
        if not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        try:
            stop = frozenset(int(t) for t in self.stop)
        except (TypeError, ValueError):
            raise SamplingError("stop", f"stop must be token ids, got {self.stop!r}") from None
        object.__setattr__(self, "stop", stop)
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise SamplingError("logprobs", f"logprobs must be an integer >= 0, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the tokens so far (a penalty is set)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def wire_fields(cls) -> list[dataclasses.Field]:
        """The fields clients set by name (the CLI's flags, the server's and Triton's fields)."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("wire")]

    @classmethod
    def from_wire(cls, values: Mapping[str, Any], **fixed) -> "SamplingParams":
        """Params from a request's fields by name (absent or None: the default; `fixed` overrides),
        numpy scalars taken as Python numbers."""
        given = {}
        for f in cls.wire_fields():
            value = values.get(f.name)
            if value is not None:
                given[f.name] = value.item() if isinstance(value, np.generic) else value
        return cls(**{**given, **fixed})


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _checked(f: dataclasses.Field, value):
    """One wire field's value of the declared type and in its range, else SamplingError."""
    name, meta = f.name, f.metadata
    is_int = f.type in ("int", int)
    if is_int:
        if not _is_int(value):
            raise SamplingError(name, f"{name} must be an integer, got {value!r}")
        value = int(value)
        if name == "top_k" and value == -1:
            return value
    else:
        if not (_is_int(value) or isinstance(value, (float, np.floating))) or not math.isfinite(value):
            raise SamplingError(name, f"{name} must be a finite number, got {value!r}")
        value = float(value)
    low, high = meta.get("low"), meta.get("high")
    below = value <= low if meta.get("low_open") else value < low if low is not None else False
    if below or (high is not None and value > high):
        span = (f"> {low}" if meta.get("low_open") else f">= {low}") if high is None else f"in [{low}, {high}]"
        raise SamplingError(name, f"{name} must be {span}{meta.get('note', '')}, got {value}")
    return value


# ---- choosing tokens ----------------------------------------------------------------------------------
def apply_penalties(logits: np.ndarray, params: SamplingParams, prompt: Sequence[int],
                    output: Sequence[int]) -> np.ndarray:
    """One row of logits [V] with the request's penalties applied, as vLLM and OpenAI define them:
    the repetition penalty on every token seen in the prompt or the output (a positive logit
    divided by it, a negative one multiplied), then the presence penalty once and the frequency
    penalty per occurrence subtracted for each token of the output. Unchanged (not copied) when
    no penalty is set."""
    if not params.penalized:
        return logits
    x = np.array(logits, np.float64)
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.asarray([*prompt, *output], np.int64))
        v = x[seen]
        x[seen] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if len(output) and (params.presence_penalty or params.frequency_penalty):
        ids, counts = np.unique(np.asarray(output, np.int64), return_counts=True)
        x[ids] -= params.presence_penalty + params.frequency_penalty * counts
    return x



def ranked_probs(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """(candidates [B, n], their probabilities [B, n]) of sampling from logits [B, V] (float64):
    most likely first, among equals the lower id (as argmax, so top_k=1 is greedy); softmax of
    logits / temperature over the top_k most likely (0: all), zero below min_p x the most likely,
    then zero beyond the smallest set whose probability reaches top_p (nucleus), renormalized."""
    vocab = logits.shape[-1]
    top_k = params.top_k
    if top_k and top_k < vocab:
        cand = np.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k]
        vals = np.take_along_axis(logits, cand, -1)
        cand = np.take_along_axis(cand, np.lexsort((cand, -vals), axis=-1), -1)
    else:
        cand = np.argsort(-logits, axis=-1, kind="stable")
    z = np.take_along_axis(logits, cand, -1) / params.temperature
    probs = np.exp(z - z[:, :1])  # the first candidate is the most likely: its weight is 1
    if params.min_p > 0:
        probs = np.where(probs >= params.min_p, probs, 0.0)  # relative to the most likely (weight 1)
    probs /= probs.sum(-1, keepdims=True)
    if params.top_p < 1.0:
        before = np.cumsum(probs, -1) - probs  # mass of the more likely candidates
        probs = np.where(before < params.top_p, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return cand, probs


class NonFiniteLogits(ExportError):
    """The model produced NaN or Inf logits: damaged weights or build, never a token to emit."""


def check_finite(logits: np.ndarray) -> None:
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).sum())
        raise NonFiniteLogits(f"the model produced {bad} non-finite logits (NaN or Inf) instead of a next-token "
                              "distribution: its weights or the build are damaged (dsv3-export verify BUILD says where)")


def sample(logits: np.ndarray, rng: np.random.Generator | None, params: SamplingParams) -> np.ndarray:
    """Next tokens [B] from last-position logits [B, V]: argmax when greedy; otherwise one draw per
    row (one uniform each, with `rng`) from `ranked_probs`. Non-finite logits raise
    NonFiniteLogits (argmax of NaN would quietly emit token 0)."""
    check_finite(logits)
    if params.greedy:
        return logits.argmax(-1)
    cand, probs = ranked_probs(logits.astype(np.float64, copy=False), params)
    batch = cand.shape[0]
    cum = np.cumsum(probs, -1)
    u = rng.random(batch)[:, None] * cum[:, -1:]
    pick = np.minimum((cum <= u).sum(-1), cand.shape[1] - 1)
    # Never land on a zero-probability tail entry through rounding.
    pick = np.minimum(pick, (probs > 0).sum(-1) - 1)
    return cand[np.arange(batch), pick]


def processed_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution `sample` draws from, over the whole vocabulary: float64
    [..., V], zero outside the top-k / min-p / nucleus set. Same candidate order and tie-breaking
    as `sample` (most likely first, among equals the lower id), so the two agree (up to which of
    several exactly equal logits at the top-k boundary is kept)."""
    logits = np.asarray(logits, dtype=np.float64)
    if params.greedy:
        raise ValueError("processed_probs is for sampling (temperature > 0); greedy needs no distribution")
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])
    vocab = flat.shape[1]
    if (not params.top_k or params.top_k >= vocab) and params.top_p >= 1.0 and params.min_p == 0:
        z = flat / params.temperature  # plain softmax: no order needed
        probs = np.exp(z - z.max(-1, keepdims=True))
        return (probs / probs.sum(-1, keepdims=True)).reshape(shape)
    order, probs = ranked_probs(flat, params)
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


@dataclass(frozen=True)
class TokenLogprob:
    """A chosen token's log-probability under the model's own distribution (before the sampling
    settings, as OpenAI's logprobs) and the `top` most likely alternatives, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """TokenLogprob of `token` from one row of logits [V]."""
    x = np.asarray(logits, np.float64)
    m = x.max()
    lp = x - (m + np.log(np.exp(x - m).sum()))
    alternatives: tuple[tuple[int, float], ...] = ()
    if top:
        idx = np.argpartition(-lp, min(top, lp.size - 1))[:top] if top < lp.size else np.arange(lp.size)
        idx = idx[np.lexsort((idx, -lp[idx]))]  # most likely first, lower id among equals
        alternatives = tuple((int(i), float(lp[i])) for i in idx)
    return TokenLogprob(float(lp[token]), alternatives)
