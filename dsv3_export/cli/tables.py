"""What `dsv3-export` prints as tables (rich): a checkpoint's description, a stage plan, a build's
summary, verification's checks and bench's figures. The commands (cli/main.py) compute; this prints."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dsv3_export.exporter.describe import human_bytes, human_count


def console() -> Console:
    term = Console()
    # Piped to a file or a CI log, rich would wrap at 80 columns and cut the tables' names short.
    return term if term.is_terminal or "COLUMNS" in os.environ else Console(width=140)


def print_description(source, info) -> None:
    """`inspect SOURCE`: shape, parameters, cache cost, MTP, stored precision."""
    cfg, params, cache = info["config"], info["parameters"], info["cache_bytes_per_token"]
    t = Table(title=f"{source} ({info['layout']})", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("layers", f"{cfg['n_layers']} ({cfg['n_dense_layers']} dense, {cfg['n_layers'] - cfg['n_dense_layers']} MoE)"),
        ("dim / heads", f"{cfg['dim']} / {cfg['n_heads']}"),
        ("MLA", f"q_lora {cfg['q_lora_rank'] or 'none'}, kv_lora {cfg['kv_lora_rank']}, "
                f"nope {cfg['qk_nope_head_dim']} + rope {cfg['qk_rope_head_dim']}, v {cfg['v_head_dim']}"),
        ("experts", f"{cfg['n_routed_experts']} routed (top-{cfg['n_activated_experts']}, "
                    f"{cfg['n_limited_groups']}/{cfg['n_expert_groups']} groups, {cfg['score_func']}), "
                    f"{cfg['n_shared_experts']} shared"),
        ("vocab / context", f"{cfg['vocab_size']} / {cfg['max_seq_len']} (YaRN {'on' if info['yarn_active'] else 'off'})"),
        ("parameters", f"{human_count(params['total'])} total, {human_count(params['activated'])} activated per token"),
        ("MTP", f"yes ({human_count(params['mtp'])} parameters)" if info["mtp"] else "no"),
        ("KV cache / token (bf16)", f"latent {human_bytes(cache['latent'])} vs naive {human_bytes(cache['naive'])} "
                                    f"({info['cache_ratio']:.1f}x smaller)"),
        (f"KV cache at full context ({cfg['max_seq_len']} tokens)",
         f"latent {human_bytes(info['cache_bytes_full_context']['latent'])} vs naive "
         f"{human_bytes(info['cache_bytes_full_context']['naive'])}"),
        ("stored weights", ", ".join(f"{k}: {v}" for k, v in sorted(info["stored_dtypes"].items()))),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console().print(t)


def print_plan(source, devices, plan) -> None:
    from dsv3_export.exporter.deploy_plan import COLUMNS, summary_lines, table_rows  # lazy: only --plan needs it

    out = console()
    *lines, verdict = summary_lines(plan, devices, source)
    for line in lines:
        out.print(escape(line))
    out.print(f"[bold {'green' if plan['fits'] else 'red'}]{escape(verdict)}[/]")
    t = Table(title=f"{devices.count} x {devices.name}, {plan['precision']}")
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("stage", "layers") else "right")
    rows = table_rows(plan)
    for i, row in enumerate(rows):
        if i == len(rows) - 1:
            t.add_section()  # the totals row
        t.add_row(*row[:-1], f"[red]{row[-1]}[/red]" if row[-1].startswith("-") else row[-1])
    out.print(t)


def print_build_summary(out, manifest) -> None:
    t = Table(title=f"{out}: {manifest.precision} / {manifest.backend} / {manifest.mla} MLA")
    t.add_column("file")
    t.add_column("size", justify="right")
    for name, f in manifest.files.items():
        t.add_row(name, human_bytes(f["bytes"]))
    console().print(t)
    if manifest.stages:
        st = Table(title="pipeline stages")
        for col in ("stage", "graph", "layers", "weights"):
            st.add_column(col, justify="right" if col == "weights" else "left")
        for s in manifest.stages:
            extra = (["embed"] if s["embed"] else []) + (["head"] if s["head"] else [])
            st.add_row(str(s["index"]), s["file"], f"{s['layers'][0]}-{s['layers'][1] - 1}"
                       + (f" + {', '.join(extra)}" if extra else ""), human_bytes(s["weight_bytes"]))
        console().print(st)
    cache = manifest.cache_bytes_per_token
    verdict = manifest.verify
    state = "skipped" if verdict is None else ("[green]passed[/]" if verdict["passed"] else "[red]FAILED[/]")
    disk = manifest.disk
    if disk and disk.get("ratio"):
        console().print(f"on disk: {human_bytes(disk['build_bytes'])} for {human_bytes(disk['weight_bytes'])} of "
                         f"weights ({disk['ratio']:.2f}x)")
    console().print(f"verify: {state}   cache per token (fp32): latent {human_bytes(cache['latent_fp32'])}, "
                     f"naive would be {human_bytes(cache['naive_fp32'])}   built in {manifest.build_seconds} s")


def print_verify(build, spec, result) -> None:
    """`verify`'s checks, one row each, and the report's path."""
    from dsv3_export.verification.report import check_summary  # lazy: loads matplotlib

    verdict = "[green]PASS[/green]" if result["passed"] else "[red]FAIL[/red]"
    t = Table(title=f"verify {build} against {spec}: {verdict}",
              caption="error: max|engine - ref| / max|ref| at the worst step")
    for col in ("check", "runner", "result", "error", "tolerance"):
        t.add_column(col)
    for c in result["checks"]:
        what, figure, tol = check_summary(c)
        t.add_row(what, c.get("runner", ""), "pass" if c["passed"] else "[red]FAIL[/red]", figure, tol)
    out = console()
    out.print(t)
    for s in result["skipped"]:
        out.print(f"skipped {s['runner']}: {s['reason']}")
    report = Path(result["report"])
    out.print(f"report: {report if report.is_absolute() else build / report}")


def print_batches(build, report, threads, contexts) -> None:
    """`bench --batch`: aggregate decode tokens/s per batch and context, against the memory bound."""
    t = Table(title=escape(f"{Path(build).name}: aggregate decode tokens/s [share of the memory bound], "
                           f"{threads} threads"))
    t.add_column("batch", justify="right")
    for c in contexts:
        t.add_column(f"decode {c}", justify="right")
    ref = "1024" if 1024 in contexts else str(contexts[-1])
    t.add_column(f"vs batch 1 @{ref}", justify="right")
    t.add_column("mixed step tok/s", justify="right")
    for r in report["batches"]:
        cells = [escape(f"{r['decode'][str(c)]['tokens_per_s']:.1f} [{r['decode'][str(c)]['reached']:.0%}]")
                 if str(c) in r["decode"] else "-" for c in contexts]
        ratio = r["vs_batch_1"].get(ref)
        t.add_row(str(r["batch"]), *cells, f"{ratio:.2f}x" if ratio else "-", f"{r['mixed']['tokens_per_s']:.1f}")
    console().print(t)
    lat = next((r["step_latency"] for r in report["batches"] if "step_latency" in r), None)
    if lat:
        console().print(f"one decode step at {lat['context']}: {lat['in_place_s'] * 1e3:.2f} ms in place, "
                         f"{lat['with_copy_s'] * 1e3:.2f} ms with the cache copied")


def bench_notes(report) -> list[str]:
    """What the `-` cells of `bench`'s table mean, and a warning when other work competed for the
    cores during the run (its ratios are then not the machine's)."""
    notes = []
    for r in report["results"]:
        name = r["kind"] if r["kind"] == "reference" else Path(r["build"]).name
        for cell, why in r.get("skipped", {}).items():
            notes.append(f"-: {name}, {cell}: {why}")
    if any(r["kind"] == "reference" for r in report["results"]):
        notes.append("-: reference, on disk: the PyTorch reference has no build")
    machine = report["machine"]
    load, cpus = machine.get("load_average_max"), machine.get("cpus")
    if load is not None and cpus and load > cpus:
        notes.append(f"warning: the load average reached {load:.1f} on {cpus} cores during the run: other work "
                     "competed for them, so these figures and ratios are not this machine's; run again when it is idle")
    return notes


def print_bench(report) -> None:
    rounds = report["params"].get("rounds", 1)
    over = f", medians of {rounds} alternating rounds" if rounds > 1 else ""
    t = Table(title=escape(f"tokens/s: median [min-max], {report['machine']['threads']} threads{over}"))
    t.add_column("system")
    phases = [("prefill", k) for k in report["params"]["prefill"]] + [("decode", k) for k in report["params"]["contexts"]]
    for phase, k in phases:
        t.add_column(f"{phase} {k}", justify="right")
    t.add_column("peak RSS", justify="right")
    t.add_column("on disk", justify="right")
    for r in report["results"]:
        name = r["kind"] if r["kind"] == "reference" else f"{Path(r['build']).name} ({r['precision']}, {r['mla']})"
        cells = []
        for phase, k in phases:
            f = r[phase].get(str(k))
            cells.append(escape(f"{f['tokens_per_s']:.1f} [{f['min']:.0f}-{f['max']:.0f}]") if f else "-")
        t.add_row(name, *cells, human_bytes(r["peak_rss_bytes"]), human_bytes(r["build_bytes"]) if "build_bytes" in r else "-")
    console().print(t)
    for line in bench_notes(report):
        console().print(escape(line))
    for label, table in report["ratios"].items():
        for build, ratios in table.items():
            parts = [f"{phase} {k}: {v:.2f}x" for phase in ("prefill", "decode") for k, v in ratios[phase].items()]
            console().print(escape(f"{label} [{Path(build).name}]: " + ", ".join(parts)))
    bandwidth = report["machine"].get("read_bandwidth_bytes_per_s")
    for r in report["results"]:
        bound = r.get("memory_bound")
        if bound and bound["decode"]:
            parts = [f"{k} <= {b['tokens_per_s']:.1f} ({b['reached']:.0%} reached"
                     + (f", bound/reference {b['vs_reference']:.2f}x)" if b.get("vs_reference") else ")")
                     for k, b in bound["decode"].items()]
            console().print(escape(f"memory bound [{Path(r['build']).name}]: {human_bytes(bound['weights']['weights'])}"
                                    f" of weights a token + the cache, at {bandwidth / 1e9:.1f} GB/s read: decode "
                                    + ", ".join(parts)))
    for r in report["results"]:
        if "session_start" in r:
            st = r["session_start"]
            console().print(escape(f"session start [{Path(r['build']).name}]: cold {st['cold_seconds']:.2f} s "
                                    f"(files evicted from the page cache), warm {st['warm_seconds']:.2f} s"))
    for r in report["results"]:
        if "speculative" in r:
            s = r["speculative"]
            console().print(escape(f"speculative [{Path(r['build']).name}]: {s['speculative']['tokens_per_s']:.1f} vs "
                                    f"{s['plain']['tokens_per_s']:.1f} tokens/s ({s['speedup']:.2f}x), "
                                    f"acceptance {s['speculative']['acceptance_rate']}"))
