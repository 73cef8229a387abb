"""`bench --batch`: what continuous batching buys: aggregate decode tokens/s of B sequences decoding
together, at each context, set against the memory bound at that batch; the tokens/s of a mixed step
(one prompt chunk prefilled while B-1 sequences decode); and the latency of one decode step with and
without a copy of the cache.

Each batch size is measured in a fresh process (benchmarks.bench's rule). Decode at context c runs
`steps` single-token steps over B rows whose caches hold c random rows, in buffers written in place
(Engine.step_in_place), a different random token per row and step (an MoE step's cost depends on the
experts its tokens route to). The bound at batch B: the step reads the dense weights once, one
embedding row per token, the experts the B tokens touch (expected share 1 - (1 - k/E)^B of each
stack, uniform routing) and B caches.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from dsv3_export.benchmarks.bench import in_child, rate_stats, time_calls
from dsv3_export.benchmarks.memory_bound import main_step_bytes, read_bandwidth
from dsv3_export.core.build_dir import read_manifest

MIXED_PREFILL = 128  # prompt tokens in the mixed step


def _random_buffers(engine, batch: int, positions: int, rng) -> list[np.ndarray]:
    bufs = engine.empty_buffers(batch, positions)
    for b in bufs:
        b[...] = 0.5 * rng.standard_normal(b.shape)
    return bufs


def _measure_batch(build_dir: str, batch: int, params: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process: decode at every context, the mixed step, the step latency."""
    from dsv3_export import engines  # lazy: each child loads only the engine it measures

    os.environ.setdefault("OMP_NUM_THREADS", str(params["threads"]))
    engine = engines.load(build_dir, threads=params["threads"])
    cfg, rng, steps = engine.config, np.random.default_rng(batch), params["decode_steps"]
    out: dict[str, Any] = {"batch": batch, "decode": {}}
    for c in params["contexts"]:
        if c + steps > cfg.max_seq_len:
            continue
        bufs = _random_buffers(engine, batch, c + steps, rng)
        toks = rng.integers(0, cfg.vocab_size, (steps, batch, 1))

        def chain():
            for k, tok in enumerate(toks):
                engine.step_in_place(tok, np.full(batch, c + k, np.int64), bufs)

        out["decode"][str(c)] = rate_stats(time_calls(chain, params["repeats"]), steps * batch)
        out["decode"][str(c)]["cache_bytes"] = batch * int(sum(b[0, :c].nbytes for b in bufs))
    out["mixed"] = _mixed_step(engine, batch, params, rng)
    if batch == 1:
        out["step_latency"] = _step_latency(engine, params, rng)
    return out


def _mixed_step(engine, batch: int, params, rng) -> dict[str, Any]:
    """One scheduler step: a 128-token prompt chunk prefilled and B-1 sequences decoding at 1024."""
    cfg, ctx = engine.config, min(1024, engine.config.max_seq_len - 8)
    decoding = _random_buffers(engine, batch - 1, ctx + 8, rng) if batch > 1 else None
    prompt = engine.empty_buffers(1, MIXED_PREFILL)
    ids = rng.integers(0, cfg.vocab_size, (1, MIXED_PREFILL))
    tok = rng.integers(0, cfg.vocab_size, (max(batch - 1, 1), 1))

    def step():
        engine.step_in_place(ids, np.zeros(1, np.int64), prompt)
        if decoding is not None:
            engine.step_in_place(tok, np.full(batch - 1, ctx, np.int64), decoding)

    return rate_stats(time_calls(step, params["repeats"]), MIXED_PREFILL + batch - 1)


def _step_latency(engine, params, rng) -> dict[str, Any]:
    """One decode step at 4096 (or the model's context): in place, and with the cache copied in and
    out (the prefix form, Engine.step), medians of seconds."""
    c = min(4096, engine.config.max_seq_len - 1)
    bufs = _random_buffers(engine, 1, c + 1, rng)
    prefix = [b[:, :c].copy() for b in bufs]
    tok = rng.integers(0, engine.config.vocab_size, (1, 1))
    in_place = time_calls(lambda: engine.step_in_place(tok, np.full(1, c, np.int64), bufs), params["repeats"])
    copied = time_calls(lambda: engine.step(tok, prefix), params["repeats"])
    return {"context": c, "in_place_s": float(np.median(in_place)), "with_copy_s": float(np.median(copied))}


def batch_bound(weights: dict[str, int], cfg: dict, batch: int, cache_bytes: int, bandwidth: float) -> dict:
    """Tokens/s the machine's read bandwidth allows for B tokens a step (module docstring)."""
    share = cfg["n_activated_experts"] / cfg["n_routed_experts"]
    touched = 1 - (1 - share) ** batch
    experts = weights["experts"] / share * touched if share else 0
    step = weights["other"] + batch * weights["embedding"] + experts + cache_bytes
    return {"bytes": int(step), "tokens_per_s": batch * bandwidth / step}


def bench_batches(build: str, batches: list[int], *, threads: int = 2, repeats: int = 3,
                  contexts=(128, 1024, 4096), decode_steps: int = 8, progress=None) -> dict[str, Any]:
    """Every batch size in a fresh process; figures against the memory bound at that batch."""
    manifest = read_manifest(build)
    params = dict(threads=threads, repeats=repeats, contexts=list(contexts), decode_steps=decode_steps)
    if progress:
        progress("read bandwidth")
    bandwidth = in_child(read_bandwidth, threads, 256)
    weights = main_step_bytes(build, manifest)
    results = []
    for b in batches:
        if progress:
            progress(f"batch {b}")
        t0 = time.time()
        r = in_child(_measure_batch, str(build), b, params)
        r["seconds"] = round(time.time() - t0, 1)
        for c, fig in r["decode"].items():
            fig["bound"] = batch_bound(weights, manifest.config, b, fig["cache_bytes"], bandwidth)
            fig["reached"] = fig["tokens_per_s"] / fig["bound"]["tokens_per_s"]
        results.append(r)
    first = results[0]["decode"] if results and results[0]["batch"] == 1 else {}
    for r in results:
        r["vs_batch_1"] = {c: f["tokens_per_s"] / first[c]["tokens_per_s"] for c, f in r["decode"].items() if c in first}
    return {"build": str(build), "threads": threads, "read_bandwidth_bytes_per_s": bandwidth, "weights": weights,
            "params": params, "batches": results}
