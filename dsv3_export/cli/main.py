"""`dsv3-export`: a thin Click layer over the Python API. Expected errors print one line, no traceback.

Each command imports what it runs inside its function: `dsv3-export --help` and a bad flag answer
at once, without loading torch, ONNX Runtime and the pipeline."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from dsv3_export.core.build_options import BACKENDS, MLA_FORMS, MOE_FORMS, PRECISIONS, BuildOptions
from dsv3_export.core.errors import ExportError

SEED = click.IntRange(min=0, max=2**63 - 1)  # numpy's generators take non-negative seeds


class _Group(click.Group):
    """Turns expected failures (bad input, missing files) into one line on stderr and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ExportError as e:
            _fail(str(e))
        except click.UsageError as e:  # a bad flag value: one line naming the flag, as for bad input
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
            _fail(f"{e.filename}: {e.strerror}" if e.filename else str(e))
        except OSError as e:
            if e.errno is None:
                raise
            _fail(f"{e.filename or 'I/O error'}: {e.strerror}")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _console():
    from rich.console import Console

    console = Console()
    # Piped to a file or a CI log, rich would wrap at 80 columns and cut the tables' names short.
    return console if console.is_terminal or "COLUMNS" in os.environ else Console(width=140)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dsv3-export")
def main() -> None:
    """DeepSeek-V3 architecture checkpoints to verified ONNX Runtime / TensorRT engines."""


@main.command()
@click.argument("source", default="demo")
@click.option("--json", "as_json", is_flag=True, help="Print the description (or the plan) as JSON.")
@click.option("--plan", "plan", default=None, metavar="NxDEVICE",
              help="Size the model over N GPUs instead: 8xH200, 4xH100, 8x80GB, 2x141GiB (docs/deploy.md).")
@click.option("--precision", default=None, help="With --plan: the build's precision (default fp32; see build).")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="With --plan: sequences decoding at once (default 32).")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="With --plan: tokens each sequence must hold (default: report what fits).")
@click.option("--prefill", type=click.IntRange(min=1), default=None,
              help="With --plan: prompt tokens in one call (default 2048).")
def inspect(source: str, as_json: bool, plan, precision, batch, context, prefill) -> None:
    """Describe a checkpoint dir or preset: shape, parameters, cache cost, MTP, stored precision.
    With --plan: the stage plan over N GPUs, each stage's memory and the cache it holds."""
    if plan is not None:
        _inspect_plan(source, plan, as_json, precision or "fp32", batch, context, prefill)
        return
    given = [f for f, v in (("--precision", precision), ("--batch", batch), ("--context", context),
                            ("--prefill", prefill)) if v is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)}: only with --plan (e.g. --plan 8xH200)")
    from rich.table import Table

    from dsv3_export.exporter.describe import describe, human_bytes, human_count
    from dsv3_export.exporter.source import open_source

    info = describe(open_source(source))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
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
        ("KV cache at 32k context", f"latent {human_bytes(info['cache_bytes_32k']['latent'])} vs naive "
                                    f"{human_bytes(info['cache_bytes_32k']['naive'])}"),
        ("stored weights", ", ".join(f"{k}: {v}" for k, v in sorted(info["stored_dtypes"].items()))),
    ]
    for k, v in rows:
        t.add_row(k, v)
    _console().print(t)


def _inspect_plan(source, plan_text, as_json, precision, batch, context, prefill) -> None:
    """`inspect --plan`: sized from the config alone, so a config.json (or a preset) suffices."""
    from dsv3_export.core.config import load_config
    from dsv3_export.exporter import deploy_plan

    devices = deploy_plan.parse_plan(plan_text)
    if source == "demo":
        from dsv3_export.exporter.source import demo_path

        source_path = demo_path()
    else:
        source_path = source
    cfg = load_config(source_path)
    options = {k: v for k, v in (("batch", batch), ("context", context), ("prefill", prefill)) if v is not None}
    plan = deploy_plan.size_plan(cfg, devices.count, devices.memory, precision, **options)
    if as_json:
        click.echo(json.dumps({"source": source, "device": devices.to_dict(), **plan}, indent=2))
    else:
        _print_plan(source, devices, plan)
    if not plan["fits"]:
        sys.exit(1)


def _print_plan(source, devices, plan) -> None:
    from rich.markup import escape
    from rich.table import Table

    from dsv3_export.exporter.deploy_plan import COLUMNS, summary_lines, table_rows

    console = _console()
    *lines, verdict = summary_lines(plan, devices, source)
    for line in lines:
        console.print(escape(line))
    console.print(f"[bold {'green' if plan['fits'] else 'red'}]{escape(verdict)}[/]")
    t = Table(title=f"{devices.count} x {devices.name}, {plan['precision']}")
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("stage", "layers") else "right")
    rows = table_rows(plan)
    for i, row in enumerate(rows):
        if i == len(rows) - 1:
            t.add_section()  # the totals row
        t.add_row(*row[:-1], f"[red]{row[-1]}[/red]" if row[-1].startswith("-") else row[-1])
    console.print(t)


@main.command("make-checkpoint")
@click.option("--preset", "preset_name", default=None, help="Preset name (tiny, small, v2-lite, v2, v3).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="A config.json (Hugging Face or DeepSeek ModelArgs) instead of a preset.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--fp8", is_flag=True, help="FP8 E4M3 weights with 128x128 block scales (DeepSeek's format).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Dtype of unquantized weights.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--layout", type=click.Choice(["hf", "deepseek"]), default="hf", show_default=True)
@click.option("--mp", type=click.IntRange(min=1), default=1, show_default=True, help="Model-parallel shards (deepseek layout).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def make_checkpoint(preset_name, config_path, out, fp8, dtype, seed, layout, mp, force) -> None:
    """Write a seeded random checkpoint (with MTP layer and tokenizer) for a preset or config."""
    from rich.progress import Progress

    import dsv3_export.exporter.names as names
    from dsv3_export.core.config import load_config
    from dsv3_export.exporter.checkpoint_writer import make_checkpoint as make
    from dsv3_export.exporter.describe import human_bytes

    if (preset_name is None) == (config_path is None):
        raise ExportError("give exactly one of --preset or --config")
    cfg = load_config(preset_name or config_path)
    total = len(names.expected_shapes(cfg))
    with Progress(transient=True) as progress:
        task = progress.add_task("writing tensors", total=total)
        path = make(cfg, out, fp8=fp8, seed=seed, dtype=dtype, layout=layout, mp=mp, force=force,
                    progress=lambda n: progress.advance(task, n))
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    click.echo(f"wrote {path} ({human_bytes(size)}, {'fp8' if fp8 else dtype}, {layout} layout)")


class _RichReporter:
    """build's progress as rich bars: one line per stage, a bar where the stage has a size."""

    def __init__(self, progress):
        self.progress, self.tasks = progress, {}

    def stage(self, name, total=None):
        task = self.progress.add_task(name, total=total)
        self.tasks[name] = task
        return lambda n=1: self.progress.advance(task, n)

    def done(self, name):
        task = self.tasks.get(name)
        if task is not None:
            total = self.progress.tasks[task].total or 1
            self.progress.update(task, total=total, completed=total)


@main.command()
@click.argument("source", default="demo")
@click.option("-o", "--out", default="build", show_default=True, type=click.Path(file_okay=False),
              help="Build directory to create.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
              help="fp8: E4M3, 128x128 block scales (DeepSeek's format); int8: W8A8; int8-wo / int4-wo: weight-only. "
                   "See docs/precision.md.")
@click.option("--keep-fp", "keep_fp", multiple=True, metavar="PATTERN",
              help="Weights (fnmatch over parameter names, e.g. 'layers.0.*') left in high precision; repeatable. "
                   "Default: embeddings, router gates, LM heads; 'default' adds to those, 'none' keeps nothing.")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(BACKENDS))
@click.option("--mla", default="absorbed", show_default=True, type=click.Choice(MLA_FORMS),
              help="absorbed: cache the latent (the point); naive: per-head K/V cache, for comparison.")
@click.option("--no-mtp", is_flag=True, help="Leave out mtp.onnx even when the checkpoint has the MTP layer.")
@click.option("--no-verify", is_flag=True, help="Skip verification against the PyTorch reference.")
@click.option("--no-lower", is_flag=True, help="Keep the portable function-body graph (no ORT-native Attention/MoE).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of a preset's random weights.")
@click.option("--max-batch", type=int, default=None, help="TensorRT: largest batch the engine takes (default 8).")
@click.option("--max-seq-len", type=int, default=None,
              help="TensorRT: longest context (past + new tokens) the engine takes (default: the model's, at most 4096).")
@click.option("--max-prefill", type=int, default=None,
              help="TensorRT: longest prompt in one call (default: --max-seq-len, at most 2048).")
@click.option("--stages", type=click.IntRange(min=1), default=1, show_default=True,
              help="Cut the model into N pipeline-stage graphs (layer ranges balanced by bytes), one per device.")
@click.option("--moe", "moe_form", default="fused", show_default=True, type=click.Choice(MOE_FORMS),
              help="fp32 ORT experts: fused (ORT's MoE kernel; best one sequence at a time) or per-expert "
                   "(MatMuls per expert; faster batched decode and prefill, slower session start).")
def build(source, out, precision, keep_fp, backend, mla, no_mtp, no_verify, no_lower, force, seed, max_batch,
          max_seq_len, max_prefill, stages, moe_form) -> None:
    """Build a verified engine directory from a checkpoint dir or preset (default: demo, the embedded
    trained model)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    options = BuildOptions(precision=precision, keep_fp=keep_fp or None, backend=backend, mla=mla, moe_form=moe_form,
                           lower=not no_lower, mtp=not no_mtp, verify=not no_verify, force=force, seed=seed,
                           stages=stages, trt=dict(max_batch=max_batch, max_seq_len=max_seq_len,
                                                   max_prefill=max_prefill)).check()
    from dsv3_export.pipeline.build import build as run_build

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        manifest = run_build(source, out, options, reporter=_RichReporter(progress))
    _print_build_summary(out, manifest)
    verdict = manifest.get("verify")
    if verdict is not None and not verdict.get("passed"):
        _fail(f"{out}: verification failed; see {Path(out) / 'verify' / 'report.md'}")


def _print_build_summary(out, manifest) -> None:
    from rich.table import Table

    from dsv3_export.exporter.describe import human_bytes

    t = Table(title=f"{out}: {manifest['precision']} / {manifest['backend']} / {manifest['mla']} MLA")
    t.add_column("file")
    t.add_column("size", justify="right")
    for name, f in manifest["files"].items():
        t.add_row(name, human_bytes(f["bytes"]))
    _console().print(t)
    if manifest.get("stages"):
        st = Table(title="pipeline stages")
        for col in ("stage", "graph", "layers", "weights"):
            st.add_column(col, justify="right" if col == "weights" else "left")
        for s in manifest["stages"]:
            extra = (["embed"] if s["embed"] else []) + (["head"] if s["head"] else [])
            st.add_row(str(s["index"]), s["file"], f"{s['layers'][0]}-{s['layers'][1] - 1}"
                       + (f" + {', '.join(extra)}" if extra else ""), human_bytes(s["weight_bytes"]))
        _console().print(st)
    cache = manifest["cache_bytes_per_token"]
    verdict = manifest.get("verify")
    state = "skipped" if verdict is None else ("[green]passed[/]" if verdict["passed"] else "[red]FAILED[/]")
    disk = manifest.get("disk")
    if disk and disk.get("ratio"):
        _console().print(f"on disk: {human_bytes(disk['build_bytes'])} for {human_bytes(disk['weight_bytes'])} of "
                         f"weights ({disk['ratio']:.2f}x)")
    _console().print(f"verify: {state}   cache per token (fp32): latent {human_bytes(cache['latent_fp32'])}, "
                     f"naive would be {human_bytes(cache['naive_fp32'])}   built in {manifest['build_seconds']} s")


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", ",").split(",") if t.strip()]
    except ValueError:
        raise ExportError(f"--ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise ExportError("empty prompt (--ids has no token ids)")
    big = next((i for i in ids if not -2**63 <= i < 2**63), None)
    if big is not None:
        raise ExportError(f"--ids: {big} is not a token id (token ids are 0..vocab_size-1)")
    return ids


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path), default="build")
@click.option("--prompt", default=None, help="Text to continue (needs the build's tokenizer.json).")
@click.option("--ids", "ids_text", default=None, metavar="1,2,3", help="Token ids to continue, comma-separated.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the K most likely (0 = all).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["ort", "trt"]), default=None, help="Default: the build's backend.")
@click.option("--speculative", is_flag=True,
              help="MTP self-speculative decoding (batch 1): the MTP graph drafts one token, one main step checks "
                   "two; same output (greedy) or same distribution (sampling), acceptance in the stats line.")
def run(build_dir, prompt, ids_text, max_new_tokens, temperature, top_k, top_p, seed, backend, speculative) -> None:
    """Generate from a build (default: ./build): stream the continuation to stdout, a stats line to stderr."""
    from dsv3_export import engines
    from dsv3_export.engines.runtime import TextStream
    from dsv3_export.engines.sampling import check_generation_args

    if (prompt is None) == (ids_text is None):
        raise ExportError("give exactly one of --prompt or --ids")
    source = prompt if prompt is not None else _parse_ids(ids_text)
    if source == "":
        raise ExportError("empty prompt")
    check_generation_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    engine = engines.load(build_dir, backend=backend)
    for hint in engine.hints:
        click.echo(f"hint: {hint}", err=True)
    stops = engine.stop_ids()
    stream = TextStream(engine.tokenizer) if engine.tokenizer is not None else None
    first = [True]

    def on_token(row: int, token: int) -> None:
        if stream is not None:
            if token not in stops:
                click.echo(stream.push(token), nl=False)
        else:
            click.echo(("" if first[0] else " ") + str(token), nl=False)
            first[0] = False
        sys.stdout.flush()

    result = engine.generate(source, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, speculative=speculative, on_token=on_token)
    click.echo(stream.flush() if stream is not None else "")
    click.echo(result.stats.summary() + (" (stopped)" if result.finish_reason == "stop" else ""), err=True)


@main.command()
@click.argument("build_dir", type=click.Path(file_okay=False))
@click.option("--source", default=None,
              help="Checkpoint dir or preset to compare against (default: the one the manifest names).")
@click.option("--seed", type=SEED, default=None, help="Seed of a preset source (default: the manifest's, else 0).")
@click.option("--decode-steps", type=click.IntRange(min=1), default=8, show_default=True,
              help="Decode steps after the prefill, fed the reference's latent cache.")
@click.option("--greedy-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Greedy tokens compared with the reference's.")
@click.option("--runner", "--backend", "backends", multiple=True, type=click.Choice(["ort", "graph", "trt"]),
              help="Runners to check: the ORT engine, the raw exported graph in ORT, TensorRT (repeatable; "
                   "default: ort, graph, and trt where TensorRT works). --backend is the older name.")
@click.option("--report-dir", type=click.Path(file_okay=False), default=None,
              help="Where to write the report (default: BUILD_DIR/verify, recorded in the manifest).")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
def verify(build_dir, source, seed, decode_steps, greedy_tokens, backends, report_dir, as_json) -> None:
    """Compare a build's graphs and engines with the PyTorch reference (Polygraphy); exit 1 on failure.

    Writes report.json, report.md and error_per_step.png to BUILD_DIR/verify (or --report-dir)."""
    from rich.progress import Progress
    from rich.table import Table

    from dsv3_export.core.build_dir import find_manifest
    from dsv3_export.exporter.source import open_source
    from dsv3_export.verification.report import check_summary
    from dsv3_export.verification.verify import source_from_manifest
    from dsv3_export.verification.verify import verify as run_verify

    build = Path(build_dir)
    if not build.is_dir():
        raise ExportError(f"{build}: no such build directory")
    manifest = find_manifest(build) or {}
    if source is None:
        src, spec = source_from_manifest(build, seed=seed)
    else:
        src, spec = open_source(source, seed=seed or 0), source
    with Progress(transient=True) as progress:
        result = run_verify(build, src, precision=manifest.get("precision", "fp32"),
                            reporter=_RichReporter(progress), decode_steps=decode_steps,
                            greedy_tokens=greedy_tokens, backends=list(backends) or None, report_dir=report_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        verdict = "[green]PASS[/green]" if result["passed"] else "[red]FAIL[/red]"
        t = Table(title=f"verify {build} against {spec}: {verdict}",
                  caption="error: max|engine - ref| / max|ref| at the worst step")
        for col in ("check", "runner", "result", "error", "tolerance"):
            t.add_column(col)
        for c in result["checks"]:
            what, figure, tol = check_summary(c)
            t.add_row(what, c.get("runner", ""), "pass" if c["passed"] else "[red]FAIL[/red]", figure, tol)
        console = _console()
        console.print(t)
        for s in result["skipped"]:
            console.print(f"skipped {s['runner']}: {s['reason']}")
        report = Path(result["report"])
        console.print(f"report: {report if report.is_absolute() else build / report}")
    if not result["passed"]:
        sys.exit(1)


def _int_list(ctx, param, value):
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@main.command("bench")
@click.argument("builds", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write all figures as JSON.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="Threads for every system measured.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed repeats (after one warm-up).")
@click.option("--prefill", default="128,1024", show_default=True, callback=_int_list, help="Prompt lengths.")
@click.option("--contexts", default="128,1024,4096", show_default=True, callback=_int_list,
              help="Cache lengths for decode.")
@click.option("--decode-steps", type=click.IntRange(min=1), default=8, show_default=True, help="Single-token steps per decode timing.")
@click.option("--no-reference", is_flag=True, help="Skip the PyTorch reference.")
@click.option("--speculative", is_flag=True, help="Also time generation with MTP speculation (needs mtp.onnx).")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run every system this many times, alternating; figures are medians over rounds.")
@click.option("--batch", "batches", default=None, callback=_int_list,
              help="Batch sizes (e.g. 1,4,16): aggregate decode tokens/s of that many sequences decoding "
                   "together, against the memory bound at each batch, instead of the single-sequence figures.")
def bench_cmd(builds, json_path, threads, repeats, prefill, contexts, decode_steps, no_reference, speculative,
              rounds, batches) -> None:
    """Prefill / decode tokens/s of one or more builds, with the PyTorch reference in the same run.

    Ratios are engine/reference and, with several builds, each build/the first."""
    from dsv3_export.benchmarks.bench import bench

    console = _console()
    if batches:
        _bench_batches(builds, batches, threads, repeats, contexts, decode_steps, json_path)
        return
    with console.status("measuring") as status:
        report = bench(list(builds), threads=threads, repeats=repeats, prefill=prefill, contexts=contexts,
                       decode_steps=decode_steps, reference=not no_reference, speculative=speculative,
                       rounds=rounds, progress=lambda what: status.update(f"measuring {what}"))
    _print_bench(report)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")


def _bench_batches(builds, batches, threads, repeats, contexts, decode_steps, json_path) -> None:
    from rich.markup import escape
    from rich.table import Table

    from dsv3_export.benchmarks.batching import bench_batches

    if any(b < 1 for b in batches):
        raise ExportError(f"--batch sizes must be >= 1, got {batches}")
    reports = []
    for build in builds:
        with _console().status("measuring") as status:
            report = bench_batches(build, batches, threads=threads, repeats=repeats, contexts=contexts,
                                   decode_steps=decode_steps, progress=lambda w: status.update(f"measuring {w}"))
        reports.append(report)
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
        _console().print(t)
        lat = next((r["step_latency"] for r in report["batches"] if "step_latency" in r), None)
        if lat:
            _console().print(f"one decode step at {lat['context']}: {lat['in_place_s'] * 1e3:.2f} ms in place, "
                             f"{lat['with_copy_s'] * 1e3:.2f} ms with the cache copied")
    if json_path:
        Path(json_path).write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2) + "\n")
        click.echo(f"wrote {json_path}")


def _print_bench(report) -> None:
    from rich.markup import escape
    from rich.table import Table

    from dsv3_export.exporter.describe import human_bytes

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
    _console().print(t)
    for label, table in report["ratios"].items():
        for build, ratios in table.items():
            parts = [f"{phase} {k}: {v:.2f}x" for phase in ("prefill", "decode") for k, v in ratios[phase].items()]
            _console().print(escape(f"{label} [{Path(build).name}]: " + ", ".join(parts)))
    bandwidth = report["machine"].get("read_bandwidth_bytes_per_s")
    for r in report["results"]:
        bound = r.get("memory_bound")
        if bound and bound["decode"]:
            parts = [f"{k} <= {b['tokens_per_s']:.1f} ({b['reached']:.0%} reached"
                     + (f", bound/reference {b['vs_reference']:.2f}x)" if b.get("vs_reference") else ")")
                     for k, b in bound["decode"].items()]
            _console().print(escape(f"memory bound [{Path(r['build']).name}]: {human_bytes(bound['weights']['weights'])}"
                                    f" of weights a token + the cache, at {bandwidth / 1e9:.1f} GB/s read: decode "
                                    + ", ".join(parts)))
    for r in report["results"]:
        if "session_start" in r:
            st = r["session_start"]
            _console().print(escape(f"session start [{Path(r['build']).name}]: cold {st['cold_seconds']:.2f} s "
                                    f"(files evicted from the page cache), warm {st['warm_seconds']:.2f} s"))
    for r in report["results"]:
        if "speculative" in r:
            s = r["speculative"]
            _console().print(escape(f"speculative [{Path(r['build']).name}]: {s['speculative']['tokens_per_s']:.1f} vs "
                                    f"{s['plain']['tokens_per_s']:.1f} tokens/s ({s['speedup']:.2f}x), "
                                    f"acceptance {s['speculative']['acceptance_rate']}"))



@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path), default="build")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences decoding at once (cache slots).")
@click.option("--max-waiting", type=click.IntRange(min=1), default=256, show_default=True,
              help="Requests queued beyond them; more answer 429.")
@click.option("--prefill-chunk", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompt tokens prefilled per scheduler step.")
@click.option("--model-name", default=None, help="The model id clients send (default: the build directory's name).")
@click.option("--api-key", default=None, envvar="DSV3_API_KEY",
              help="Require `Authorization: Bearer KEY` on /v1/* (env DSV3_API_KEY).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default=None, help="Default: the build's backend.")
@click.option("--graceful-timeout", type=click.IntRange(min=0), default=30, show_default=True,
              help="Seconds open requests get to finish after SIGTERM.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve(build_dir, host, port, max_batch, max_waiting, prefill_chunk, model_name, api_key, threads, backend,
          graceful_timeout, log_level) -> None:
    """Serve BUILD_DIR over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics) with continuous batching. SIGTERM stops it gracefully."""
    from dsv3_export import engines
    from dsv3_export import server
    engine = engines.load(build_dir, backend=backend, threads=threads)
    for hint in engine.hints:
        click.echo(f"hint: {hint}", err=True)
    name = model_name or Path(build_dir).resolve().name
    click.echo(f"serving {build_dir} as {name!r} on http://{host}:{port}/v1 (max batch {max_batch})", err=True)
    server.serve(engine, host=host, port=port, model_name=name, api_key=api_key, max_batch=max_batch,
                 max_waiting=max_waiting, prefill_chunk=prefill_chunk, log_level=log_level,
                 graceful_timeout=graceful_timeout)


@main.command("bench-serve")
@click.argument("url")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True, help="Concurrent clients.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests in all.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Completion tokens per request (EOS ignored).")
@click.option("--model", default=None, help="Model id to send (default: the server's first in /v1/models).")
@click.option("--api-key", default=None, envvar="DSV3_API_KEY")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the prompts' token ids.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures as JSON.")
def bench_serve(url, concurrency, n_requests, prompt_tokens, max_tokens, model, api_key, seed, json_path) -> None:
    """Load-test an OpenAI-compatible server at URL (e.g. http://127.0.0.1:8000) with streaming clients."""
    from dsv3_export.server import loadgen

    try:
        report = loadgen.run(url, concurrency=concurrency, requests=n_requests, prompt_tokens=prompt_tokens,
                             max_tokens=max_tokens, model=model, api_key=api_key, seed=seed)
    except Exception as e:  # connection refused, a bad answer to /v1/models
        raise ExportError(f"{url}: {type(e).__name__}: {e}") from None
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    t, i = report["ttft_ms"], report["itl_ms"]
    click.echo(f"{report['succeeded']}/{n_requests} requests, {report['completion_tokens']} completion tokens in "
               f"{report['wall_seconds']:.2f} s: {report['completion_tokens_per_s']} tokens/s; "
               f"TTFT p50 {t['p50']} ms p99 {t['p99']} ms; ITL p50 {i['p50']} ms p99 {i['p99']} ms")
    if report["failed"]:
        _fail(f"{report['failed']} requests failed: {'; '.join(report['errors'])}")


def _gpu_list(ctx, param, value):
    if value is None:
        return None
    try:
        gpus = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated GPU indices, got {value!r}") from None
    if not gpus:
        raise click.BadParameter("no GPU index given")
    return gpus


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "repo", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The model repository to write.")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: python-backend stage models on ONNX Runtime; gpu: onnxruntime / tensorrt_plan models.")
@click.option("--gpus", default=None, metavar="0,1,...", callback=_gpu_list,
              help="--device gpu: the GPU of each stage, in stage order (default 0..N-1).")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Instances of each stage model.")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="--device cpu: ONNX Runtime intra-op threads per stage instance (0 = its default).")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences the dsv3 model decodes at once.")
@click.option("--force", is_flag=True, help="Replace REPO if dsv3-export wrote it.")
@click.option("--serve", is_flag=True, help="Then run tritonserver over it until Ctrl-C / SIGTERM.")
@click.option("--host", default="127.0.0.1", show_default=True, help="--serve: address to listen on.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="--serve: metrics (default: off).")
def triton(build_dir, repo, device, gpus, instances, threads, max_batch, force, serve, host, http_port, grpc_port,
           metrics_port) -> None:
    """Write BUILD_DIR as a Triton Inference Server model repository (docs/triton.md): one model per
    pipeline stage and the decoupled `dsv3` text model (generate / generate_stream, gRPC streaming)."""
    from dsv3_export.deploy.triton_repo import write_repository

    done = write_repository(build_dir, repo, device=device, gpus=gpus, instances=instances, threads=threads,
                            max_batch=max_batch, force=force)
    kinds = sorted(set(done["links"].values()) - {"copy"})
    click.echo(f"wrote {repo}: models {', '.join(done['models'])} ({device}"
               f"{'; files linked: ' + ', '.join(kinds) if kinds else ''})", err=True)
    if serve:
        from dsv3_export.deploy.tritonserver import serve as run_server

        sys.exit(run_server(repo, http_port, grpc_port, host, metrics_port=metrics_port,
                            log=lambda m: click.echo(m, err=True)))


if __name__ == "__main__":
    main()
