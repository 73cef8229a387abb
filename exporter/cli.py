"""`dsv3-export`: a thin Click layer over the Python API. Expected errors print one line, no traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import ExportError


class _Group(click.Group):
    """Turns expected failures (bad input, missing files) into one line on stderr and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ExportError as e:
            _fail(str(e))
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

    return Console()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dsv3-export")
def main() -> None:
    """DeepSeek-V3 architecture checkpoints to verified ONNX Runtime / TensorRT engines."""


@main.command()
@click.argument("source", default="tiny")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def inspect(source: str, as_json: bool) -> None:
    """Describe a checkpoint dir or preset: shape, parameters, cache cost, MTP, stored precision."""
    from rich.table import Table

    from . import open_source
    from .inspect import describe, human_bytes, human_count

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


@main.command("make-checkpoint")
@click.option("--preset", "preset_name", default=None, help="Preset name (tiny, small, v2-lite, v2, v3).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="A config.json (Hugging Face or DeepSeek ModelArgs) instead of a preset.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--fp8", is_flag=True, help="FP8 E4M3 weights with 128x128 block scales (DeepSeek's format).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", help="Dtype of unquantized weights.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--layout", type=click.Choice(["hf", "deepseek"]), default="hf", show_default=True)
@click.option("--mp", type=int, default=1, show_default=True, help="Model-parallel shards (deepseek layout).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def make_checkpoint(preset_name, config_path, out, fp8, dtype, seed, layout, mp, force) -> None:
    """Write a seeded random checkpoint (with MTP layer and tokenizer) for a preset or config."""
    from rich.progress import Progress

    from . import names
    from .config import load_config
    from .inspect import human_bytes
    from .synth import make_checkpoint as make

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
@click.argument("source", default="tiny")
@click.option("-o", "--out", default="build", show_default=True, type=click.Path(file_okay=False),
              help="Build directory to create.")
@click.option("--precision", default="fp32", show_default=True, help="fp32 (fp8/int8/int4 come with their issue).")
@click.option("--backend", default="ort", show_default=True, type=click.Choice(["ort", "trt"]))
@click.option("--mla", default="absorbed", show_default=True, type=click.Choice(["absorbed", "naive"]),
              help="absorbed: cache the latent (the point); naive: per-head K/V cache, for comparison.")
@click.option("--no-mtp", is_flag=True, help="Leave out mtp.onnx even when the checkpoint has the MTP layer.")
@click.option("--no-verify", is_flag=True, help="Skip verification against the PyTorch reference.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of a preset's random weights.")
def build(source, out, precision, backend, mla, no_mtp, no_verify, force, seed) -> None:
    """Build a verified engine directory from a checkpoint dir or preset (default: tiny)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from .build import build as run_build

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        manifest = run_build(source, out, precision=precision, backend=backend, mla=mla, mtp=not no_mtp,
                             verify=not no_verify, force=force, reporter=_RichReporter(progress), seed=seed)
    _print_build_summary(out, manifest)
    verdict = manifest.get("verify")
    if verdict is not None and not verdict.get("passed"):
        _fail(f"{out}: verification failed; see {Path(out) / 'verify' / 'report.md'}")


def _print_build_summary(out, manifest) -> None:
    from rich.table import Table

    from .inspect import human_bytes

    t = Table(title=f"{out}: {manifest['precision']} / {manifest['backend']} / {manifest['mla']} MLA")
    t.add_column("file")
    t.add_column("size", justify="right")
    for name, f in manifest["files"].items():
        t.add_row(name, human_bytes(f["bytes"]))
    _console().print(t)
    cache = manifest["cache_bytes_per_token"]
    verdict = manifest.get("verify")
    state = "skipped" if verdict is None else ("[green]passed[/]" if verdict["passed"] else "[red]FAILED[/]")
    _console().print(f"verify: {state}   cache per token (fp32): latent {human_bytes(cache['latent_fp32'])}, "
                     f"naive would be {human_bytes(cache['naive_fp32'])}   built in {manifest['build_seconds']} s")


if __name__ == "__main__":
    main()
