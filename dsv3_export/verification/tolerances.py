"""Acceptance criteria per precision: what each output of each graph, the greedy continuation and
the language-model figures must meet (docs/precision.md, "Verification thresholds")."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from dsv3_export.core.errors import ExportError


@dataclass(frozen=True)
class Tolerance:
    """One acceptance criterion. metric:
    - "rel_max": max|engine - ref| <= limit x max|ref| (per step, per output);
    - "greedy_prefix": the generated tokens agree with the reference's for at least limit x n tokens
      from the start (every row of the batch).
    - "cosine": cosine similarity of engine and reference output (flattened) >= limit, per step;
    - "lm_cosine" / "lm_top1" / "lm_kl": next-token figures over >= 256 positions of real text
      (verification/lm_eval.py): mean logits cosine >= limit, top-1 agreement >= limit, mean
      KL(reference || engine) <= limit. "lm_cosine_emulated" (fp8): the same cosine against the
      reference that runs the graph's own dequantized weights and activation quantization.
    docs/precision.md explains the numbers."""

    metric: str
    limit: float


# precision -> {output name or fnmatch pattern, or "greedy" -> Tolerance}. The first matching key wins.
TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fp32": {
        "logits": Tolerance("rel_max", 1e-4),
        "hidden_states": Tolerance("rel_max", 1e-4),
        "present_latent.*": Tolerance("rel_max", 1e-4),
        "greedy": Tolerance("greedy_prefix", 1.0),
        "lm_cosine": Tolerance("lm_cosine", 0.9999),
        "lm_top1": Tolerance("lm_top1", 0.99),
        "lm_kl": Tolerance("lm_kl", 1e-4),
    },
}


def _quantized(cosine: float, top1: float, kl: float, steps: float, emulated: float | None = None) -> dict:
    """A quantized precision against the fp32 reference: per-step outputs by cosine, greedy tokens
    reported but not required to agree (a quantized model may pick another token at a near tie,
    and then continues differently), the language-model figures required."""
    table = {"logits": Tolerance("cosine", steps), "hidden_states": Tolerance("cosine", steps),
             "present_latent.*": Tolerance("cosine", steps), "greedy": Tolerance("greedy_prefix", 0.0),
             "lm_cosine": Tolerance("lm_cosine", cosine), "lm_top1": Tolerance("lm_top1", top1),
             "lm_kl": Tolerance("lm_kl", kl)}
    if emulated is not None:
        table["lm_cosine_emulated"] = Tolerance("lm_cosine", emulated)
    return table


# One row per precision (docs/precision.md, "Verification thresholds"): lm cosine, lm top-1, lm KL
# (nats), per-step output cosine, [fp8: cosine against the emulated reference].
TOLERANCES.update({
    "fp8": _quantized(0.99, 0.90, 0.05, 0.98, emulated=0.999),
    "int8": _quantized(0.99, 0.90, 0.05, 0.98),
    "int8-wo": _quantized(0.99, 0.90, 0.05, 0.98),
    "int4-wo": _quantized(0.97, 0.80, 0.20, 0.95),
})
REFERENCE_DTYPE = {"fp32": "float32"}


def tolerance_for(precision: str, output: str) -> Tolerance:
    table = TOLERANCES.get(precision)
    if table is None:
        raise ExportError(f"no verification tolerances for precision {precision!r} "
                          f"(known: {', '.join(TOLERANCES)})")
    if output in table:
        return table[output]
    for pattern, tol in table.items():
        if fnmatch.fnmatchcase(output, pattern):
            return tol
    raise ExportError(f"no verification tolerance for output {output!r} at precision {precision!r}")


def output_group(name: str) -> str:
    """present_latent.7 -> present_latent.* (one check for all layers); others unchanged."""
    return re.sub(r"\.\d+$", ".*", name)
