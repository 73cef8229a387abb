"""Speculation's worth: plain vs MTP-speculative decoding on one engine, the one measurement that
`dsv3-export bench --speculative`, tools/speculative_figures.py and the Python API report."""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from dsv3_export.core.errors import ExportError


def measure(engine, prompts: Sequence[Any], *, max_new_tokens: int = 128, temperature: float = 0.0,
            top_k: int = 0, top_p: float = 1.0, seed: int = 0, repeats: int = 1, warmup: bool = True) -> dict:
    """Plain vs speculative decoding on one engine, prompt by prompt (batch 1), interleaved so that
    machine load hits both alike. Returns decode tokens/s of each (total decode tokens over total
    decode seconds, and the median over runs), the speedup, MTP acceptance rate, mean tokens per
    main-graph step, and whether the greedy outputs are equal."""
    if engine.mtp_session is None:
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
