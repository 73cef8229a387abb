"""The verification report: table rows, the markdown page and the error-per-step plot."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from dsv3_export.core.build_dir import MAIN_GRAPH

PLOT_FLOOR = 1e-12  # exact zeros drawn here on the log axis


def _fmt(x, spec=".2e") -> str:
    return "n/a" if x is None else format(x, spec)


def check_summary(check: dict) -> tuple[str, str, str]:
    """(what, figure, tolerance) strings for a table row, without the runner."""
    if check["kind"] == "greedy":
        return (f"greedy {check['tokens']} tokens", f"{min(check['matching_prefix'])}/{check['tokens']} agree",
                f">= {check['tolerance']:.0%}")
    if check["kind"] == "lm":
        op = "<=" if check["metric"] == "lm_kl" else ">="
        return check["name"].rsplit(" [", 1)[0], _fmt(check["value"], ".4g"), f"{op} {check['tolerance']:g}"
    what = f"{check['graph'].removesuffix('.onnx')} {check.get('output', '')}".strip()
    if check.get("metric") == "cosine" and check["kind"] == "outputs":
        return what, f"cos {_fmt(check.get('cosine'), '.5f')} @ step {check['worst_step']}", f">= {check['tolerance']:g}"
    if check["kind"] == "error":
        error = check.get("error", "error")
        return check["name"].rsplit(" [", 1)[0], error if len(error) <= 60 else error[:59] + "…", ""
    return what, f"{_fmt(check['rel_err'])} @ step {check['worst_step']}", f"{_fmt(check['tolerance'], '.0e')}"


def write_plot(checks: list[dict], path: Path) -> Path | None:
    """Relative error per step, log scale, one line per (runner, output), one panel per graph, with the
    tolerance lines. None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    outputs = [c for c in checks if c["kind"] == "outputs"]
    graphs = list(OrderedDict.fromkeys(c["graph"] for c in outputs)) or [MAIN_GRAPH]
    fig, axes = plt.subplots(1, len(graphs), figsize=(6.5 * len(graphs), 4.2), squeeze=False, sharey=True)
    styles = [("-", "o"), ("--", "x"), (":", "s"), ("-.", "^")]
    runners = list(OrderedDict.fromkeys(c["runner"] for c in outputs))
    groups = list(OrderedDict.fromkeys(c["output"] for c in outputs))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, graph in zip(axes[0], graphs):
        tols = set()
        for c in (c for c in outputs if c["graph"] == graph):
            xs = [s["step"] for s in c["steps"] if s["rel_err"] is not None]
            ys = [max(s["rel_err"], PLOT_FLOOR) for s in c["steps"] if s["rel_err"] is not None]
            line, marker = styles[runners.index(c["runner"]) % len(styles)]
            ax.plot(xs, ys, linestyle=line, marker=marker, markersize=4,
                    color=colors[groups.index(c["output"]) % len(colors)], label=f"{c['output']} [{c['runner']}]")
            tols.add(1.0 - c["tolerance"] if c.get("metric") == "cosine" else c["tolerance"])
        for tol in sorted(tols):
            ax.axhline(tol, color="red", linewidth=1.2, label=f"tolerance {tol:.0e}")
        ax.set_yscale("log")
        ax.set_title(graph)
        ax.set_xlabel("step (0 = prefill, then decode)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("1 - cosine" if any(c.get("metric") == "cosine" for c in outputs)
                          else "max|engine - ref| / max|ref|")
    fig.suptitle("relative error per step vs the PyTorch reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_markdown(report: dict, path: Path, plot: Path | None) -> None:
    verdict = "PASS" if report["passed"] else "FAIL"
    lines = [
        f"# Verification: {verdict}", "",
        f"- precision: {report['precision']}; reference: PyTorch ({report['reference_dtype']})",
        f"- inputs: batch {report['inputs']['batch']}, prompt {report['inputs']['prompt_len']} tokens, "
        f"prefill + {report['inputs']['decode_steps']} decode steps (past from the reference), "
        f"greedy {report['inputs']['greedy_tokens']} tokens",
        f"- runners: {', '.join(report['runners'])}",
    ]
    for s in report["skipped"]:
        lines.append(f"- skipped {s['runner']}: {s['reason']}")
    lines += ["", "| check | runner | result | worst error | tolerance |", "|---|---|---|---|---|"]
    for c in report["checks"]:
        what, fig, tol = check_summary(c)
        cells = [what, c.get("runner", ""), "pass" if c["passed"] else "**FAIL**", fig, tol]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    lines += ["", "Error = max|engine - reference| / max|reference| of each output at a step (the worst step "
              "shown; worst layer for present_latent.*); tolerance on the same scale. Greedy: tokens equal to "
              "the reference's from the start, worst row of the batch.", ""]
    if plot is not None:
        lines += [f"![relative error per step]({plot.name})", ""]
    for c in report["checks"]:
        if c["kind"] == "greedy" and not c["passed"]:
            lines += [f"{c['name']}: first divergence per row {c['first_divergence']}", ""]
    path.write_text("\n".join(lines))
