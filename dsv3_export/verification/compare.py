"""Polygraphy compare functions for verification: max-relative error and cosine, each result carrying
the figures the report shows (verification/checks.py composes them per precision)."""

from __future__ import annotations

import math
from collections import OrderedDict


class RelMaxCompare:
    """A Comparator compare function: Polygraphy's simple comparison (max statistic, rtol 0) with each
    output's atol = limit x max|reference output| of this iteration. Each result object also carries
    `ref_absmax` and `rel_limit` for the report."""

    def __init__(self, limits: dict[str, float]):
        self.limits = limits

    def __call__(self, ref_result, result):
        import numpy as np

        absmax = {name: float(np.abs(np.asarray(ref_result[name], dtype=np.float64)).max(initial=0.0))
                  for name in ref_result.keys() if name in self.limits}
        atol = {name: self.limits[name] * absmax[name] for name in absmax}
        if not any(name in result for name in absmax):  # none of the outputs: all fail (Polygraphy would raise)
            return OrderedDict((name, False) for name in absmax)
        simple = _simple_compare_func(atol=atol, rtol={"": 0.0}, check_error_stat="max",
                                      find_output_func=lambda name, index, other: [name] if name in absmax else None)
        matches = simple(ref_result, result)
        for name, match in matches.items():
            if not isinstance(match, bool):
                match.ref_absmax = absmax.get(name)
                match.rel_limit = self.limits.get(name)
        for name in absmax:  # an output the runner did not produce fails (Polygraphy would skip it)
            if name not in matches:
                matches[name] = False
        return matches


class CosineMatch:
    """One output's cosine at one step: truthy when it passes."""

    def __init__(self, cosine: float, limit: float):
        self.cosine, self.limit = cosine, limit

    def __bool__(self) -> bool:
        return self.cosine >= self.limit


class CosineCompare:
    """A Comparator compare function: cosine similarity of each output with the reference's
    (flattened, float64); NaN/inf or a shape mismatch fail."""

    def __init__(self, limits: dict[str, float]):
        self.limits = limits

    def __call__(self, ref_result, result):
        import numpy as np

        matches = OrderedDict()
        for name, limit in self.limits.items():
            if name not in ref_result.keys():
                continue
            if name not in result.keys():
                matches[name] = False
                continue
            r = np.asarray(ref_result[name], np.float64).ravel()
            e = np.asarray(result[name], np.float64)
            if e.size != r.size:
                matches[name] = False
                continue
            e = e.ravel()
            if not np.isfinite(e).all():
                matches[name] = CosineMatch(float("nan"), limit)
                continue
            norm = np.linalg.norm(r) * np.linalg.norm(e)
            cos = float(r @ e / norm) if norm > 0 else float(np.array_equal(r, e))
            matches[name] = CosineMatch(cos, limit)
        return matches


def _simple_compare_func(**kw):
    """Polygraphy's simple comparison: SimpleCompareFunc (>= 0.50), CompareFunc.simple before."""
    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:
        from polygraphy.comparator import CompareFunc

        return CompareFunc.simple(**kw)
    return SimpleCompareFunc(**kw)


def step_figures(match) -> dict:
    """Figures of one output at one step, from a compare function's result object."""
    if isinstance(match, CosineMatch):  # rel_err = 1 - cosine: the worst step sorts and plots the same way
        ok = match.cosine == match.cosine
        return {"cosine": match.cosine if ok else None, "rel_err": 1.0 - match.cosine if ok else None,
                "max_abs_err": None, "max_abs_ref": None, "tolerance": match.limit, "passed": bool(match)}
    if isinstance(match, bool) or getattr(match, "ref_absmax", None) is None:  # e.g. a shape mismatch
        return {"max_abs_err": None, "max_abs_ref": None, "rel_err": None, "tolerance": None, "passed": bool(match)}
    absmax, err = match.ref_absmax, float(match.max_absdiff)
    if not math.isfinite(err) or not math.isfinite(absmax):  # NaN/inf: no figure (JSON has none), a failure
        return {"max_abs_err": None, "max_abs_ref": absmax if math.isfinite(absmax) else None, "rel_err": None,
                "tolerance": match.rel_limit, "passed": False, "note": "non-finite values"}
    rel = err / absmax if absmax > 0 else (0.0 if err == 0 else float("inf"))
    return {"max_abs_err": err, "max_abs_ref": absmax, "rel_err": rel if math.isfinite(rel) else None,
            "tolerance": match.rel_limit, "passed": bool(match)}
