"""`dsv3-export`: a thin Click layer over the Python API. Expected errors print one line, no traceback.

Each command imports what it runs inside its function: `dsv3-export --help` and a bad flag answer
at once, without loading torch, ONNX Runtime and the pipeline."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import click

from dsv3_export.cli import tables
from dsv3_export.core.build_options import BACKENDS, DEFAULT_BUILD_DIR, MLA_FORMS, MOE_FORMS, PRECISIONS, BuildOptions
from dsv3_export.core.errors import ExportError, allocation_failure

SEED = click.IntRange(min=0, max=2**63 - 1)  # numpy's generators take non-negative seeds
REVISION_HELP = ("For a Hugging Face id ORG/NAME: the branch, tag or commit (default main); the local cache is "
                 "looked up first, then the hub.")


def sampling_params(values):
    """SamplingParams from `run`'s flags; a bad value is one line naming the flag, then the wording
    every surface uses for that field (engines.sampling)."""
    from dsv3_export.engines.sampling import SamplingError, SamplingParams

    try:
        return SamplingParams.from_wire(values)
    except SamplingError as e:
        flag = "--max-new-tokens" if e.param == "max_tokens" else f"--{e.param.replace('_', '-')}"
        raise ExportError(f"{flag}: {e}") from None


def sampling_options(command):
    """A flag per sampling field of engines.sampling.SamplingParams (`--top-p` for top_p, ...), its
    default and help from the field: a new field reaches `run` with no change here. The values are
    checked by SamplingParams itself, in the words every surface uses."""
    from dsv3_export.engines.sampling import SamplingParams

    for f in reversed(SamplingParams.wire_fields()):
        flags = ["--max-new-tokens", "--max-tokens"] if f.name == "max_tokens" else [f"--{f.name.replace('_', '-')}"]
        command = click.option(*flags, f.name, type=int if f.type in ("int", int) else float, default=f.default,
                               show_default=True, help=f.metadata["help"])(command)
    return command


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
        except (MemoryError, RuntimeError) as e:  # an allocation failure anywhere: its words name the bytes
            why = allocation_failure(e)
            if why is None:
                raise
            _fail(f"{ctx.invoked_subcommand or ctx.info_name}: out of memory: {why}")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


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
@click.option("--revision", default=None, help=REVISION_HELP)
def inspect(source: str, as_json: bool, plan, precision, batch, context, prefill, revision) -> None:
    """Describe a checkpoint dir, Hugging Face id or preset: shape, parameters, cache cost, MTP, stored
    precision. With --plan: the stage plan over N GPUs, each stage's memory and the cache it holds."""
    if plan is not None:
        _inspect_plan(source, plan, as_json, precision or "fp32", batch, context, prefill, revision)
        return
    given = [f for f, v in (("--precision", precision), ("--batch", batch), ("--context", context),
                            ("--prefill", prefill)) if v is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)}: only with --plan (e.g. --plan 8xH200)")
    from dsv3_export.exporter.describe import describe
    from dsv3_export.exporter.source import open_source

    info = describe(open_source(source, revision=revision))
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    tables.print_description(source, info)


def _config_path(source, revision):
    """What load_config reads for SOURCE: the demo's folder, a Hugging Face id's config.json (alone:
    sizing needs no weights), else SOURCE as given."""
    import dsv3_export.exporter.hub as hub

    if source == "demo":
        from dsv3_export.exporter.source import demo_path

        return demo_path()
    if hub.is_hub_id(source):
        return hub.resolve(source, revision, config_only=True, log=lambda m: click.echo(m, err=True))
    if revision is not None:
        raise ExportError(f"--revision {revision}: for a Hugging Face id (ORG/NAME), not {source}")
    return source


def _inspect_plan(source, plan_text, as_json, precision, batch, context, prefill, revision=None) -> None:
    """`inspect --plan`: sized from the config alone, so a config.json (or a preset) suffices."""
    from dsv3_export.core.config import load_config
    from dsv3_export.exporter import deploy_plan

    devices = deploy_plan.parse_plan(plan_text)
    cfg = load_config(_config_path(source, revision))
    options = {k: v for k, v in (("batch", batch), ("context", context), ("prefill", prefill)) if v is not None}
    plan = deploy_plan.size_plan(cfg, devices.count, devices.memory, precision, **options)
    if as_json:
        click.echo(json.dumps({"source": source, "device": devices.to_dict(), **plan}, indent=2))
    else:
        tables.print_plan(source, devices, plan)
    if not plan["fits"]:
        sys.exit(1)


@main.command("make-checkpoint")
@click.option("--preset", "preset_name", default=None, help="Preset name (tiny, small, demo, v2-lite, v2, v3).")
@click.option("--config", "config_path", default=None,
              help="A config.json (Hugging Face or DeepSeek ModelArgs), or a Hugging Face id, instead of a preset.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--fp8", is_flag=True, help="FP8 E4M3 weights with 128x128 block scales (DeepSeek's format).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Dtype of unquantized weights.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--layout", type=click.Choice(["hf", "deepseek"]), default="hf", show_default=True)
@click.option("--mp", type=click.IntRange(min=1), default=1, show_default=True, help="Model-parallel shards (deepseek layout).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--revision", default=None, help="With --config ORG/NAME: " + REVISION_HELP)
def make_checkpoint(preset_name, config_path, out, fp8, dtype, seed, layout, mp, force, revision) -> None:
    """Write a seeded random checkpoint (with MTP layer and tokenizer) for a preset or config."""
    from rich.progress import Progress

    import dsv3_export.exporter.names as names
    from dsv3_export.core.config import load_config
    from dsv3_export.exporter.checkpoint_writer import make_checkpoint as make
    from dsv3_export.exporter.describe import human_bytes

    if (preset_name is None) == (config_path is None):
        raise ExportError("give exactly one of --preset or --config")
    cfg = load_config(preset_name or _config_path(config_path, revision))
    total = len(names.expected_shapes(cfg))
    with Progress(transient=True) as progress:
        task = progress.add_task("writing tensors", total=total)
        path = make(cfg, out, fp8=fp8, seed=seed, dtype=dtype, layout=layout, mp=mp, force=force,
                    progress=lambda n: progress.advance(task, n))
    size = sum(f.stat().st_size for f in Path(path).iterdir())
    click.echo(f"wrote {path} ({human_bytes(size)}, {'fp8' if fp8 else dtype}, {layout} layout)")


@contextlib.contextmanager
def _progress(transient: bool):
    """The reporter of a long command: rich progress bars on a terminal; elsewhere (a pipe, a CI
    log) the default Reporter's log lines on stderr, periodic inside each stage."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, transient=transient) as progress:
            yield _RichReporter(progress)
        return
    from dsv3_export.core.progress import Reporter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("dsv3_export")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        yield Reporter()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


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
@click.option("-o", "--out", default=DEFAULT_BUILD_DIR, show_default=True, type=click.Path(file_okay=False),
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
@click.option("--revision", default=None, help=REVISION_HELP)
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
def build(source, out, precision, keep_fp, backend, mla, no_mtp, no_verify, no_lower, force, seed, revision, max_batch,
          max_seq_len, max_prefill, stages, moe_form) -> None:
    """Build a verified engine directory from a checkpoint dir or preset (default: demo, the embedded
    trained model)."""
    options = BuildOptions(precision=precision, keep_fp=keep_fp or None, backend=backend, mla=mla, moe_form=moe_form,
                           lower=not no_lower, mtp=not no_mtp, verify=not no_verify, force=force, seed=seed,
                           revision=revision, stages=stages, trt=dict(max_batch=max_batch, max_seq_len=max_seq_len,
                                                   max_prefill=max_prefill)).check()
    from dsv3_export.pipeline.build import build as run_build

    with _progress(transient=False) as reporter:
        manifest = run_build(source, out, options, reporter=reporter)
    tables.print_build_summary(out, manifest)
    verdict = manifest.verify
    if verdict is not None and not verdict.get("passed"):
        _fail(f"{out}: verification failed; see {Path(out) / 'verify' / 'report.md'}")


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
@click.argument("build_dir", type=click.Path(path_type=Path), default=DEFAULT_BUILD_DIR)
@click.option("--prompt", default=None, help="Text to continue (needs the build's tokenizer.json).")
@click.option("--ids", "ids_text", default=None, metavar="1,2,3", help="Token ids to continue, comma-separated.")
@sampling_options
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Default: the build's backend.")
@click.option("--speculative", is_flag=True,
              help="MTP self-speculative decoding (batch 1): the MTP graph drafts one token, one main step checks "
                   "two; same output (greedy) or same distribution (sampling), acceptance in the stats line.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--echo/--no-echo", default=True, show_default=True,
              help="Print the --prompt text before its continuation.")
@click.option("--stop", "stop_strings", multiple=True, metavar="TEXT",
              help="End the generation where its text contains TEXT (left out of the output; repeatable).")
@click.option("--chat", is_flag=True,
              help="An interactive chat through the build's chat template, with its history: one user turn per "
                   "line of input; an empty line, /exit or the end of input ends it.")
@click.option("--system", default=None, help="With --chat: a system message before the first turn.")
def run(build_dir, prompt, ids_text, backend, speculative, threads, echo, stop_strings, chat, system,
        **sampling) -> None:
    """Generate from a build (default: ./dsv3-build): stream the continuation to stdout, a stats line to stderr."""
    from dsv3_export import engines
    from dsv3_export.engines.text import TextOutput

    if chat:
        if prompt is not None or ids_text is not None:
            raise ExportError("--chat reads its turns from the input: not with --prompt or --ids")
    elif system is not None:
        raise ExportError("--system is for --chat")
    elif (prompt is None) == (ids_text is None):
        raise ExportError("give exactly one of --prompt or --ids")
    if chat:
        params = sampling_params(sampling)
        engine = engines.load(build_dir, backend=backend, threads=threads)
        from dsv3_export.cli.chat import chat_session

        chat_session(engine, engine.sampling_params(params), stop_strings, system, speculative)
        return
    source = prompt if prompt is not None else _parse_ids(ids_text)
    if source == "":
        raise ExportError("empty prompt")
    params = sampling_params(sampling)  # a bad value fails before the build loads
    engine = engines.load(build_dir, backend=backend, threads=threads)
    for hint in engine.hints:
        click.echo(f"hint: {hint}", err=True)
    params = engine.sampling_params(params)
    out = TextOutput(engine.tokenizer, stop_strings=stop_strings, stop_ids=params.stop)

    def on_token(row: int, token: int) -> None:
        starting = not out.token_ids
        if starting and echo and prompt is not None:  # as llama-cli: the prompt (once accepted), then the rest
            click.echo(prompt, nl=False)
        piece = out.push(token)
        click.echo(piece if engine.tokenizer is not None else ("" if starting else " ") + str(token), nl=False)
        sys.stdout.flush()

    result = engine.generate(source, params, stop_strings=stop_strings, speculative=speculative, on_token=on_token)
    click.echo(out.finish())
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
@click.option("--revision", default=None, help="With --source ORG/NAME: " + REVISION_HELP)
def verify(build_dir, source, seed, decode_steps, greedy_tokens, backends, report_dir, as_json, revision) -> None:
    """Compare a build's graphs and engines with the PyTorch reference (Polygraphy); exit 1 on failure.

    Writes report.json, report.md and error_per_step.png to BUILD_DIR/verify (or --report-dir)."""

    from dsv3_export.core.build_dir import find_manifest
    from dsv3_export.exporter.source import open_source
    from dsv3_export.verification.verify import source_from_manifest
    from dsv3_export.verification.verify import verify as run_verify

    build = Path(build_dir)
    if not build.is_dir():
        raise ExportError(f"{build}: no such build directory")
    manifest = find_manifest(build)
    if source is None:
        src, spec = source_from_manifest(build, seed=seed)
    else:
        src, spec = open_source(source, seed=seed or 0, revision=revision), source
    with _progress(transient=True) as reporter:
        result = run_verify(build, src, precision=manifest.precision if manifest is not None else "fp32",
                            reporter=reporter, decode_steps=decode_steps,
                            greedy_tokens=greedy_tokens, backends=list(backends) or None, report_dir=report_dir)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        tables.print_verify(build, spec, result)
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

    console = tables.console()
    if batches:
        _bench_batches(builds, batches, threads, repeats, contexts, decode_steps, json_path)
        return
    with console.status("measuring") as status:
        report = bench(list(builds), threads=threads, repeats=repeats, prefill=prefill, contexts=contexts,
                       decode_steps=decode_steps, reference=not no_reference, speculative=speculative,
                       rounds=rounds, progress=lambda what: status.update(f"measuring {what}"))
    tables.print_bench(report)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}")


def _bench_batches(builds, batches, threads, repeats, contexts, decode_steps, json_path) -> None:
    from dsv3_export.benchmarks.batching import bench_batches

    if any(b < 1 for b in batches):
        raise ExportError(f"--batch sizes must be >= 1, got {batches}")
    reports = []
    for build in builds:
        with tables.console().status("measuring") as status:
            report = bench_batches(build, batches, threads=threads, repeats=repeats, contexts=contexts,
                                   decode_steps=decode_steps, progress=lambda w: status.update(f"measuring {w}"))
        reports.append(report)
        tables.print_batches(build, report, threads, contexts)
    if json_path:
        Path(json_path).write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2) + "\n")
        click.echo(f"wrote {json_path}")


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path), default=DEFAULT_BUILD_DIR)
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
@click.option("--client-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds a client has to send a request's headers (else its connection closes) and then its "
                   "body (else 408).")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve(build_dir, host, port, max_batch, max_waiting, prefill_chunk, model_name, api_key, threads, backend,
          graceful_timeout, client_timeout, log_level) -> None:
    """Serve BUILD_DIR over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics) with continuous batching. SIGTERM stops it gracefully."""
    from dsv3_export import engines, server
    from dsv3_export.core.http_limits import check_port_free
    from dsv3_export.server.protocol import check_api_key

    if api_key is None and os.environ.get("DSV3_API_KEY") is not None:  # Click reads an empty variable as unset
        api_key = os.environ["DSV3_API_KEY"]
    check_api_key(api_key)  # before the build loads
    check_port_free(host, port, "--port")
    engine = engines.load(build_dir, backend=backend, threads=threads)
    for hint in engine.hints:
        click.echo(f"hint: {hint}", err=True)
    name = model_name or Path(build_dir).resolve().name
    click.echo(f"serving {build_dir} as {name!r} on http://{host}:{port}/v1 (max batch {max_batch})", err=True)
    server.serve(engine, host=host, port=port, model_name=name, api_key=api_key, max_batch=max_batch,
                 max_waiting=max_waiting, prefill_chunk=prefill_chunk, log_level=log_level,
                 graceful_timeout=graceful_timeout, client_timeout=client_timeout)


@main.command("bench-serve")
@click.argument("url")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True, help="Concurrent clients.")
@click.option("--requests", "n_requests", type=click.IntRange(min=1), default=32, show_default=True,
              help="Requests in all.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--max-tokens", "--max-new-tokens", "max_tokens", type=click.IntRange(min=1), default=64,
              show_default=True,
              help="Completion tokens per request (EOS ignored).")
@click.option("--model", default=None, help="Model id to send (default: the server's first in /v1/models).")
@click.option("--api-key", default=None, envvar="DSV3_API_KEY")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the prompts' token ids.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=600.0, show_default=True,
              help="Seconds to wait for the server at each step of a request (connect, first byte, next byte).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the figures as JSON.")
def bench_serve(url, concurrency, n_requests, prompt_tokens, max_tokens, model, api_key, seed, timeout,
                json_path) -> None:
    """Load-test an OpenAI-compatible server at URL (e.g. http://127.0.0.1:8000) with streaming clients."""
    from dsv3_export.server import loadgen

    try:
        report = loadgen.run(url, concurrency=concurrency, requests=n_requests, prompt_tokens=prompt_tokens,
                             max_tokens=max_tokens, model=model, api_key=api_key, seed=seed, timeout=timeout)
    except ExportError:
        raise
    except Exception as e:  # anything else the client library raised, in words
        raise ExportError(f"{url}: {loadgen.reason(e, timeout)}") from None
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
@click.option("--client-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="--serve: seconds an HTTP client has to send a request's headers, then its body.")
def triton(build_dir, repo, device, gpus, instances, threads, max_batch, force, serve, host, http_port, grpc_port,
           metrics_port, client_timeout) -> None:
    """Write BUILD_DIR as a Triton Inference Server model repository (docs/triton.md): one model per
    pipeline stage and the decoupled `dsv3` text model (generate / generate_stream, gRPC streaming)."""
    if serve:  # taken ports fail before the repository is written
        from dsv3_export.core.http_limits import check_port_free

        check_port_free(host, http_port, "--http-port")
        check_port_free(host, grpc_port, "--grpc-port")
    from dsv3_export.deploy.triton_repo import write_repository

    done = write_repository(build_dir, repo, device=device, gpus=gpus, instances=instances, threads=threads,
                            max_batch=max_batch, force=force)
    kinds = sorted(set(done["links"].values()) - {"copy"})
    click.echo(f"wrote {repo}: models {', '.join(done['models'])} ({device}"
               f"{'; files linked: ' + ', '.join(kinds) if kinds else ''})", err=True)
    if serve:
        from dsv3_export.deploy.tritonserver import serve as run_server

        sys.exit(run_server(repo, http_port, grpc_port, host, metrics_port=metrics_port,
                            client_timeout=client_timeout, log=lambda m: click.echo(m, err=True)))


if __name__ == "__main__":
    main()
