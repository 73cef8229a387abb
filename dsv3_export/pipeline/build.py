"""`build`: checkpoint -> verified engine directory, atomically.

Work happens in a temporary sibling of OUT that is renamed at the end; a failure anywhere leaves
nothing behind. The directory holds model.onnx (+ .data), mtp.onnx (+ .data), tokenizer.json, the
backend's engine files, verify/ and manifest.json (core/build_dir.py; docs/design.md, "Graph contract").
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import onnx_ir as ir
from tokenizers import Tokenizer

import dsv3_export.engines.ort as ort_engine
import dsv3_export.engines.trt as trt_engine
from dsv3_export.core.build_dir import (
    MAIN_GRAPH,
    MTP_GRAPH,
    TOKENIZER,
    TOKENIZER_CONFIG,
    disk_usage,
    graph_io,
    write_manifest,
)
from dsv3_export.core.build_options import DEFAULT_BUILD_DIR, BuildOptions
from dsv3_export.core.errors import ExportError, allocation_failure
from dsv3_export.core.progress import Reporter
from dsv3_export.exporter.checkpoint import Checkpoint
from dsv3_export.exporter.describe import cache_bytes_per_token
from dsv3_export.exporter.export import export_main, export_mtp, export_stage, meta_model
from dsv3_export.exporter.passes.attach_weights import attach_weights
from dsv3_export.exporter.passes.cleanup import cleanup
from dsv3_export.exporter.passes.lower_ort import lower_ort
from dsv3_export.exporter.passes.plugin_attrs import plugin_attrs
from dsv3_export.exporter.passes.pretranspose import pretranspose
from dsv3_export.exporter.passes.quantize import quantize
from dsv3_export.exporter.precision_policy import Policy
from dsv3_export.exporter.resources import check_build_fits, check_reference_fits
from dsv3_export.exporter.source import has_gate_bias, open_source
from dsv3_export.exporter.stage_plan import plan_stages
from dsv3_export.exporter.tokenizer_training import train_tokenizer
from dsv3_export.pipeline.output_dir import atomic_dir
from dsv3_export.verification.verify import verify as run_verify

__all__ = ["build"]


def tool_versions() -> dict[str, str]:
    out = {}
    for pkg in ("dsv3-export", "torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-gpu",
                "polygraphy", "tensorrt"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def source_info(source, spec: str | Path) -> dict[str, Any]:
    if isinstance(source, Checkpoint):
        # The checkpoint's own folder: a preset name like "demo" opens an embedded checkpoint.
        info = {"kind": "checkpoint", "path": str(Path(source.path).resolve()), "layout": source.layout,
                "fingerprint": source.fingerprint()}
        return {**info, "hub": source.hub} if getattr(source, "hub", None) else info
    blob = json.dumps({"preset": str(spec), "seed": source.seed, "config": source.config.to_dict()}, sort_keys=True)
    return {"kind": "preset", "name": str(spec), "seed": source.seed,
            "fingerprint": hashlib.sha256(blob.encode()).hexdigest()}


def export_graph(kind: str, source, out_dir: Path, reporter: Reporter, *, mla: str = "absorbed",
                 lower: bool = False, moe_form: str = "fused", policy=None, quant_target: str = "ort",
                 layers: range | None = None) -> Path:
    """Trace one graph ("model", "mtp", or "stage{k}" over `layers`), run the passes, save it with its
    weights streamed out."""
    model = meta_model(source.config, mla=mla, has_gate_bias=has_gate_bias(source), mtp=kind == "mtp")
    reporter.stage(f"tracing {kind}.onnx")
    if layers is not None:
        graph = export_stage(model, layers.start, layers.stop)
    else:
        graph = export_main(model) if kind == "model" else export_mtp(model)
    reporter.done(f"tracing {kind}.onnx")
    graph = attach_weights(plugin_attrs(graph), source)
    if policy is not None and policy.scheme is not None:  # before cleanup: it needs the traced MatMul forms
        graph = quantize(graph, source, policy, target=quant_target)
    graph = cleanup(graph)
    if lower:  # ONNX Runtime's native Attention / MoE kernels in place of the portable bodies
        graph = lower_ort(graph, moe_form)
    graph = pretranspose(graph)  # Wᵀ stored once: ONNX Runtime then has no transposed copy to fold
    graph.producer_name, graph.producer_version = "dsv3-export", tool_versions().get("dsv3-export", "")
    path = out_dir / f"{kind}.onnx"
    step = f"writing {kind}.onnx weights"
    advance = reporter.stage(step, total=len(graph.graph.initializers))
    writing: list[str] = []  # the tensor being written (the saver calls back before each)

    def on_tensor(tensor, info) -> None:
        writing[:] = [tensor.name]
        advance(1)

    try:
        ir.save(graph, path, external_data=f"{kind}.onnx.data", callback=on_tensor)
    except Exception as e:
        why = allocation_failure(e)
        if why is None:
            raise
        raise ExportError(f"{step}: out of memory at tensor {writing[0] if writing else '?'}: {why}") from None
    reporter.done(step)
    return path


def export_main_graphs(source, out_dir: Path, reporter: Reporter, stages: int, precision: str, keep_fp=None,
                       **options) -> tuple[dict[str, Path], list[dict] | None]:
    """model.onnx, or with stages > 1 one graph per stage (exporter.stage_plan: layer ranges
    balanced by stored bytes). Returns the graphs and the manifest's "stages" entry (None unstaged)."""
    if stages == 1:
        return {MAIN_GRAPH: export_graph("model", source, out_dir, reporter, **options)}, None
    plan = plan_stages(source.config, stages, precision, keep_fp)
    graphs, entries = {}, []
    for stage in plan:
        name = f"stage{stage.index}"
        graphs[f"{name}.onnx"] = export_graph(name, source, out_dir, reporter, layers=stage.layers, **options)
        entries.append({"file": f"{name}.onnx", **stage.to_dict()})
    return graphs, entries


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """A tokenizer.json that `run` will be able to load, and whose ids fit the model."""
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises its own exception types
        raise ExportError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if tok.get_vocab_size() > vocab_size:
        raise ExportError(f"{path}: {tok.get_vocab_size()} tokens, more than the model's vocab_size ({vocab_size})")


def write_tokenizer(source, spec: str | Path, out_dir: Path) -> Path | None:
    """tokenizer.json into the build, and the checkpoint's tokenizer_config.json with it when it has
    one (its chat_template and special tokens: `dsv3-export serve` renders chats with it)."""
    dest = out_dir / TOKENIZER
    if isinstance(source, Checkpoint):  # both under the checkpoint's path rule (docs/reliability.md)
        tok_config = source.file(TOKENIZER_CONFIG, required=False)
        if tok_config is not None:
            shutil.copyfile(tok_config, out_dir / TOKENIZER_CONFIG)
        tok = source.file(TOKENIZER, required=False)
        if tok is None:
            return None
        check_tokenizer(tok, source.config.vocab_size)
        shutil.copyfile(tok, dest)
    else:
        train_tokenizer(source.config.vocab_size).save(str(dest))
    return dest


def build(source_spec: str | Path = "demo", out: str | Path = DEFAULT_BUILD_DIR, options: BuildOptions | None = None, *,
          reporter: Reporter | None = None) -> dict[str, Any]:
    """Export, pass, build the engine, verify, write the manifest, as `options` asks
    (core.build_options.BuildOptions). Returns the manifest (plus the verify verdict under "verify")."""
    reporter = reporter or Reporter()
    o = (options or BuildOptions()).check()
    policy = Policy.make(o.precision, o.keep_fp)  # a bad --keep-fp pattern fails here
    if o.backend == "trt":
        trt_engine.require_tensorrt()  # before any work: one line when TensorRT, a GPU or Triton is missing
    source = open_source(source_spec, seed=o.seed, revision=o.revision)
    if o.stages > source.config.n_layers:
        raise ExportError(f"--stages {o.stages}: the model has only {source.config.n_layers} layers "
                          "(at most one stage per layer)")
    policy.check_patterns(n for n, _ in meta_model(source.config, mla=o.mla, mtp=o.mtp).named_parameters())
    check_build_fits(source.config, Path(out), o.precision, o.keep_fp, mtp=o.mtp and source.has_mtp)
    if o.verify:
        check_reference_fits(source.config, "the build's verification")
    if o.backend == "trt":  # bad options fail before the export, not after
        resolved_trt = trt_engine.TrtOptions.from_dict(o.trt).resolve(source.config.max_seq_len)
    started = time.time()
    with atomic_dir(Path(out), o.force, source.path if isinstance(source, Checkpoint) else None) as tmp:
        lower = o.lower and o.backend == "ort"
        target = "ort" if o.backend == "ort" else "qdq"  # TensorRT takes the Q/DQ form
        passes = dict(mla=o.mla, lower=lower, moe_form=o.moe_form, policy=policy, quant_target=target)
        graphs, stage_entries = export_main_graphs(source, tmp, reporter, o.stages, o.precision, o.keep_fp, **passes)
        if o.mtp and source.has_mtp:
            graphs[MTP_GRAPH] = export_graph("mtp", source, tmp, reporter, **passes)
        write_tokenizer(source, source_spec, tmp)
        info: dict[str, Any] = {
            "config": source.config.to_dict(), "precision": o.precision, "backend": o.backend, "mla": o.mla,
            "lowered": lower, **({"moe_form": o.moe_form} if lower else {}),
            **({"stages": stage_entries} if stage_entries else {}),
            "quantization": {**policy.to_dict(), "form": target} if policy.scheme is not None else None,
            "source": source_info(source, source_spec), "tools": tool_versions(),
            "io": {name: graph_io(path) for name, path in graphs.items()},
            "cache_bytes_per_token": {"latent_fp32": cache_bytes_per_token(source.config, 4)["latent"],
                                      "naive_fp32": cache_bytes_per_token(source.config, 4)["naive"]},
        }
        if o.backend == "trt":
            reporter.stage("building the TensorRT engines")
            info["engine"] = trt_engine.prepare(tmp, graphs, resolved_trt)
            reporter.done("building the TensorRT engines")
        else:
            reporter.stage("building the ONNX Runtime engine")
            info["engine"] = ort_engine.prepare(graphs)
            reporter.done("building the ONNX Runtime engine")
        if o.verify:
            info["verify"] = run_verify(tmp, source, precision=o.precision, reporter=reporter,
                                        quantization=info["quantization"])
        info["disk"] = disk_usage(tmp, list(graphs))
        info["build_seconds"] = round(time.time() - started, 1)
        manifest = write_manifest(tmp, info)
    return manifest
