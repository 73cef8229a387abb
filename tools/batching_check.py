"""Continuous batching's acceptance checks on any build (docs/performance.md, "Continuous batching"):

1. N greedy prompts of lengths 3..200 (real text through the build's tokenizer, or random ids)
   submitted together, and staggered (one every few steps): each sequence's tokens against that
   prompt generated alone;
2. one long generation: resident memory after the cache is allocated against the end.

    python tools/batching_check.py BUILD [--prompts 16] [--tokens 24] [--long 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3_export import engines  # noqa: E402
from dsv3_export.engines.sampling import SamplingParams  # noqa: E402
from dsv3_export.engines.scheduler import Scheduler  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def prompts(engine, n: int, lo: int = 3, hi: int = 200, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = np.linspace(lo, hi, n).astype(int)
    bos = engine.config.bos_token_id or 0
    return [[bos] + rng.integers(2, engine.config.vocab_size, int(k) - 1).tolist() for k in lengths]


def run(engine, todo: list[list[int]], params: SamplingParams, *, max_batch: int, every: int = 0,
        chunk: int = 512) -> tuple[list[list[int]], float, int]:
    """(tokens per prompt, seconds, largest batch): all at once (every=0) or one new every `every` steps."""
    s = Scheduler(engine, max_batch=max_batch, prefill_chunk=chunk)
    reqs, steps, t0 = [], 0, time.perf_counter()
    if not every:
        reqs = [s.submit(p, params) for p in todo]
    while len(reqs) < len(todo) or not s.idle:
        if every and len(reqs) < len(todo) and steps % every == 0:
            reqs.append(s.submit(todo[len(reqs)], params))
        s.step()
        steps += 1
    return [r.tokens for r in reqs], time.perf_counter() - t0, s.stats.largest_batch


def long_generation(engine, tokens: int) -> dict:
    s = Scheduler(engine, max_batch=1)
    marks = {}

    def note(req, tok):
        if len(req.tokens) in (16, tokens // 2, tokens):
            marks[len(req.tokens)] = rss_bytes()

    r = s.submit([engine.config.bos_token_id or 0, 5, 6], SamplingParams(max_tokens=tokens), on_token=note)
    s.run()
    first = marks[16]
    return {"tokens": len(r.tokens), "cache_bytes": s.cache.nbytes, "rss_after_16": first,
            "rss_end": marks[tokens], "growth": marks[tokens] / first - 1}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--long", type=int, default=2000, help="tokens of the long generation (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    engine = engines.load(args.build, threads=args.threads)
    todo = prompts(engine, args.prompts)
    params = SamplingParams(max_tokens=args.tokens)
    alone = [run(engine, [p], params, max_batch=1)[0][0] for p in todo]
    together, t_together, b1 = run(engine, todo, params, max_batch=len(todo))
    staggered, t_staggered, b2 = run(engine, todo, params, max_batch=max(2, len(todo) // 2), every=3, chunk=64)
    out = {"build": args.build, "prompts": len(todo), "tokens": args.tokens,
           "together_equal": [a == b for a, b in zip(alone, together)],
           "staggered_equal": [a == b for a, b in zip(alone, staggered)],
           "together_seconds": round(t_together, 2), "staggered_seconds": round(t_staggered, 2),
           "largest_batch": [b1, b2]}
    if args.long and args.long + 3 <= engine.config.max_seq_len:
        out["long"] = long_generation(engine, args.long)
    print(json.dumps({k: (all(v) if k.endswith("_equal") else v) for k, v in out.items()}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
