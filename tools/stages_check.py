"""Pipeline stages' acceptance checks on any pair of builds of the same weights (docs/deploy.md,
"Pipeline stages, checked"): a `--stages N` build against the one-graph build.

1. logits, hidden states and every cache row of a prefill (batch 2) and `--steps` decode steps, each
   engine on its own cache: max |staged - one| / max |one| per output;
2. a greedy continuation of `--tokens` tokens from each of `--prompts` prompts: identical or not.

    python tools/stages_check.py STAGED ONE [--steps 8] [--tokens 32] [--prompts 4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3_export import engines  # noqa: E402


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def compare_steps(staged, one, steps: int, seed: int = 0) -> dict[str, float]:
    ids = np.random.default_rng(seed).integers(2, one.config.vocab_size, (2, 24))
    past_s, past_o = staged.empty_past(2), one.empty_past(2)
    worst = {"logits": 0.0, "hidden_states": 0.0, "present_latent": 0.0}
    for _ in range(steps + 1):
        ls, hs, past_s = staged.forward(ids, past_s)
        lo, ho, past_o = one.forward(ids, past_o)
        worst["logits"] = max(worst["logits"], rel(ls, lo))
        worst["hidden_states"] = max(worst["hidden_states"], rel(hs, ho))
        worst["present_latent"] = max(worst["present_latent"], max(rel(a, b) for a, b in zip(past_s, past_o)))
        ids = lo[:, -1:].argmax(-1)
    return worst


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("staged")
    ap.add_argument("one")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    staged, one = engines.load(args.staged, threads=args.threads), engines.load(args.one, threads=args.threads)
    result = {"staged": args.staged, "one": args.one, "stages": [s["layers"] for s in staged.stages],
              "max_rel_err": compare_steps(staged, one, args.steps), "greedy": []}
    rng = np.random.default_rng(1)
    for k in range(args.prompts):
        prompt = rng.integers(2, one.config.vocab_size, 8 + 16 * k).tolist()
        a = staged.generate(prompt, max_new_tokens=args.tokens, add_bos=False).ids
        b = one.generate(prompt, max_new_tokens=args.tokens, add_bos=False).ids
        result["greedy"].append({"prompt_tokens": len(prompt), "tokens": len(b), "identical": a == b})
    result["passed"] = all(v <= 1e-5 for v in result["max_rel_err"].values()) and \
        all(g["identical"] for g in result["greedy"])
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["passed"] else 1)
