"""Checks: Polygraphy's per-output comparison results and the greedy continuations turned into the
report's check records, one per (runner, output group), each with its worst step."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from dsv3_export.core.build_dir import MAIN_GRAPH
from dsv3_export.core.errors import ExportError
from dsv3_export.verification.compare import CosineCompare, RelMaxCompare, step_figures
from dsv3_export.verification.tolerances import Tolerance, output_group, tolerance_for


def compare_funcs(precision: str, outputs: Sequence[str]) -> list:
    by_metric: dict[str, dict[str, float]] = {}
    for name in outputs:
        tol = tolerance_for(precision, name)
        by_metric.setdefault(tol.metric, {})[name] = tol.limit
    funcs = []
    for metric, limits in by_metric.items():
        if metric == "rel_max":
            funcs.append(RelMaxCompare(limits))
        elif metric == "cosine":
            funcs.append(CosineCompare(limits))
        else:
            raise ExportError(f"verification metric {metric!r} has no compare function yet")
    return funcs


def graph_checks(graph: str, precision: str, accuracy, labels: list[dict], runner_names: dict[str, str]) -> list[dict]:
    """One check per (runner, output group); at each step the group's worst output stands for it."""
    checks = []
    # Polygraphy >= 0.50 returns one AccuracyResult per compare func (AccuracyResults), older ones one.
    for acc in ([accuracy] if hasattr(accuracy, "keys") else accuracy):
        for (_, runner_name), iterations in acc.items():
            backend = runner_names[runner_name]
            groups: dict[str, list[dict]] = OrderedDict()
            for label, matches in zip(labels, iterations):
                per_group: dict[str, list[dict]] = OrderedDict()
                for out_name, match in matches.items():
                    fig = {**step_figures(match), "output": out_name}
                    per_group.setdefault(output_group(out_name), []).append(fig)
                for g, figs in per_group.items():
                    worst = max(figs, key=_badness)
                    groups.setdefault(g, []).append({**label, **worst, "passed": all(f["passed"] for f in figs)})
            for g, steps in groups.items():
                worst = max(steps, key=_badness)
                tol = tolerance_for(precision, worst["output"])
                checks.append({
                    "name": f"{graph} {g} [{backend}]", "kind": "outputs", "graph": graph, "output": g,
                    "runner": backend, "metric": tol.metric, "tolerance": tol.limit,
                    "passed": all(s["passed"] for s in steps),
                    "rel_err": worst["rel_err"], "max_abs_err": worst["max_abs_err"],
                    "max_abs_ref": worst["max_abs_ref"], "worst_step": worst["step"],
                    **({"cosine": worst.get("cosine")} if tol.metric == "cosine" else {}),
                    "worst_output": worst["output"], "steps": steps,
                })
    return checks


def _badness(fig: dict) -> float:
    """Sort key: a figure-less failure (shape mismatch) is the worst."""
    return float("inf") if fig["rel_err"] is None else fig["rel_err"]


def greedy_check(backend: str, ref_tokens, tokens, tol: Tolerance) -> dict:
    n = ref_tokens.shape[1]
    agree = []
    for r, e in zip(ref_tokens, tokens):
        diff = [i for i in range(n) if r[i] != e[i]]
        agree.append(diff[0] if diff else n)
    fraction = min(agree) / n
    return {
        "name": f"greedy {n} tokens [{backend}]", "kind": "greedy", "graph": MAIN_GRAPH, "runner": backend,
        "metric": tol.metric, "tolerance": tol.limit, "passed": fraction >= tol.limit,
        "tokens": n, "agreement": fraction, "matching_prefix": agree,
        "first_divergence": [a if a < n else None for a in agree],
        "reference_tokens": ref_tokens.tolist(), "engine_tokens": tokens.tolist(),
    }
