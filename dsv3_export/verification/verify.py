"""Verification: the built graphs and engines against the PyTorch reference (docs/design.md, "Verification").

Polygraphy's `Comparator` runs every runner on the same feed dicts and compares each runner's outputs
with the reference's, output by output:

- runners (verification.runners): `ReferenceRunner` (the PyTorch model behind the graph contract's
  names), "ort" (the ONNX Runtime engine as deployed: `engines.ort.session`, its options and
  optimization level), "graph" (the exported graph in ONNX Runtime through Polygraphy's
  `SessionFromOnnx`),
  "trt" (Polygraphy's `TrtRunner` over the build's plan; by default only where TensorRT works and
  the build has model.plan);
- inputs (verification.inputs): a prefill (batch 2, a 12-token prompt, an empty past) and a chain of
  decode steps, each fed the REFERENCE's present latents and argmax token, so every runner sees
  identical inputs; the MTP graph gets tokens i+1 with the reference's h_i and its own reference
  latent chain;
- criteria (verification.tolerances): one entry per output (pattern); fp32 checks max|engine - ref|
  against `limit` x max|ref| for that step (a relative-to-max criterion; elementwise relative error
  explodes on values near 0);
- greedy: `greedy_tokens` tokens from the reference's `generate_greedy` against each runner driven
  with its own cache; language-model figures on real text (verification.lm_eval).

The report goes to BUILD_DIR/verify/: report.json (every check, every step's figures), report.md
(verdict, table, error plot) and error_per_step.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from dsv3_export.core.build_dir import (
    MAIN_GRAPH,
    MTP_GRAPH,
    cache_layout,
    chain_io,
    check_file_hashes,
    find_manifest,
    find_stages,
    graph_io,
    update_manifest,
)
from dsv3_export.core.errors import ExportError
from dsv3_export.core.progress import Reporter
from dsv3_export.exporter.checkpoint import Checkpoint
from dsv3_export.exporter.resources import check_reference_fits
from dsv3_export.exporter.source import load_reference, open_source
from dsv3_export.verification.checks import compare_funcs, graph_checks, greedy_check
from dsv3_export.verification.inputs import make_inputs, step_labels
from dsv3_export.verification.lm_eval import SEQ as LM_SEQ
from dsv3_export.verification.lm_eval import lm_checks
from dsv3_export.verification.report import write_markdown, write_plot
from dsv3_export.verification.runners import (
    CPU,
    RUNNERS,
    ReferenceRunner,
    empty_past,
    runner_greedy,
    runners_for,
    tensorrt_available,
)
from dsv3_export.verification.tolerances import REFERENCE_DTYPE, TOLERANCES, tolerance_for

__all__ = ["verify", "source_from_manifest", "ReferenceRunner", "TOLERANCES", "tolerance_for"]

REPORT_DIR = "verify"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "error_per_step.png"
REFERENCE = "pytorch"


# ---- sources ----------------------------------------------------------------------------------------
def source_from_manifest(build_dir: str | Path, *, seed: int | None = None):
    """The weight source a build was made from, as its manifest names it: (open source, spec)."""
    manifest = find_manifest(build_dir)
    if manifest is None:
        raise ExportError(f"{build_dir}: no manifest.json (not a build directory?); give --source")
    src = manifest.source
    if src.get("kind") == "preset":
        return open_source(src["name"], seed=src.get("seed", 0) if seed is None else seed), src["name"]
    if src.get("kind") == "checkpoint":
        return open_source(src["path"]), src["path"]
    raise ExportError(f"{build_dir}/manifest.json: no usable \"source\" entry; give --source")


def _describe_source(source) -> dict:
    if isinstance(source, Checkpoint):
        return {"kind": "checkpoint", "path": str(source.path), "fingerprint": source.fingerprint()}
    return {"kind": "preset", "seed": getattr(source, "seed", None)}


# ---- which runners ----------------------------------------------------------------------------------
def _choose_runners(build_dir: Path, runners: Sequence[str] | None) -> tuple[list[str], list[dict]]:
    """(runners to check, skipped with reasons). None: ort, graph, and trt where TensorRT works and
    the build has a plan; a runner asked for explicitly that cannot run is an error."""
    explicit = runners is not None
    chosen = list(runners) if explicit else list(RUNNERS)
    for r in chosen:
        if r not in RUNNERS:
            raise ExportError(f"unknown verify runner {r!r} (choose from {', '.join(RUNNERS)})")
    skipped = []
    if "trt" in chosen:
        ok, why = tensorrt_available()
        if ok and not explicit and not (build_dir / "model.plan").is_file():
            # An ORT build's graph may be lowered to ONNX Runtime-only ops; building an engine from it
            # is for an explicit --runner trt.
            ok, why = False, "the build has no TensorRT plan (model.plan); --backend trt builds one from the ONNX"
        if not ok:
            if explicit:
                raise ExportError(f"verify runner trt: {why}")
            chosen.remove("trt")
            skipped.append({"runner": "trt", "reason": why})
    return chosen, skipped


# ---- the stages -------------------------------------------------------------------------------------
def _compare_graphs(build_dir: Path, graphs, precision: str, runners: list[str], providers: list[str],
                    reporter: Reporter) -> list[dict]:
    """Per graph: the reference's outputs on its feeds against each runner's, one check per output group."""
    checks: list[dict] = []
    for graph, ref_runner, feeds, io in graphs:
        stage = f"verify: comparing {graph}"
        advance = reporter.stage(stage, total=len(runners) + 1)
        results = Comparator.run([ref_runner], data_loader=feeds)
        advance(1)
        names = {}
        for backend in runners:
            try:  # a runner that cannot load or run the graph fails its check, with the reason
                (_, runner), = runners_for(build_dir, graph, [backend], providers, feeds)
                results.extend(Comparator.run([runner], data_loader=feeds))
                names[runner.name] = backend
            except Exception as e:
                checks.append({"name": f"{graph} run [{backend}]", "kind": "error", "graph": graph,
                               "runner": backend, "passed": False, "error": _one_line(e)})
            advance(1)
        if names:
            funcs = compare_funcs(precision, [o["name"] for o in io["outputs"]])
            accuracy = Comparator.compare_accuracy(  # a list of compare funcs needs Polygraphy >= 0.50
                results, comparisons=[(0, i) for i in range(1, len(names) + 1)],
                compare_func=funcs[0] if len(funcs) == 1 else funcs)
            checks += graph_checks(graph, precision, accuracy, step_labels(feeds), names)
        reporter.done(stage)
    return checks


def _greedy_checks(build_dir: Path, model, prompt, precision: str, runners: list[str], providers: list[str],
                   feeds, io, greedy_tokens: int, reporter: Reporter) -> list[dict]:
    """The reference's greedy continuation against each runner's, each driven with its own cache."""
    checks = []
    advance = reporter.stage("verify: greedy continuations", total=greedy_tokens * (len(runners) + 1))
    with torch.no_grad():
        ref_tokens = model.generate_greedy(torch.from_numpy(prompt), greedy_tokens).numpy()
    advance(greedy_tokens)
    tol = tolerance_for(precision, "greedy")
    for backend in runners:
        try:
            (_, runner), = runners_for(build_dir, MAIN_GRAPH, [backend], providers, feeds)
            first = empty_past(io, prompt.shape[0], prompt.shape[1] + greedy_tokens)
            tokens = runner_greedy(runner, prompt, greedy_tokens, first, advance)
            checks.append(greedy_check(backend, ref_tokens, tokens, tol))
        except Exception as e:
            checks.append({"name": f"greedy {greedy_tokens} tokens [{backend}]", "kind": "error",
                           "graph": MAIN_GRAPH, "runner": backend, "passed": False, "error": _one_line(e)})
    reporter.done("verify: greedy continuations")
    return checks


def _write_report(build_dir: Path, report_dir, report: dict, checks: list[dict]) -> tuple[Path, bool]:
    """report.json, report.md and the plot; (the folder, whether it is the build's own verify/)."""
    in_build = report_dir is None or Path(report_dir).resolve() == (build_dir / REPORT_DIR).resolve()
    out_dir = build_dir / REPORT_DIR if in_build else Path(report_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = write_plot(checks, out_dir / PLOT_PNG)
    report["plot"] = f"{REPORT_DIR}/{PLOT_PNG}" if plot else None
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out_dir / REPORT_MD, plot)
    return out_dir, in_build


# ---- the entry point --------------------------------------------------------------------------------
def _check_build(build_dir: Path) -> None:
    """A finished build (one with manifest.json) is checked as `run` checks it before verify reads
    or writes anything: a manifest of a newer format is refused (find_manifest), and so is an entry
    outside the build or a file whose size or sha256 differs (check_file_hashes). A build directory
    without a manifest (pipeline.build's temporary one) has nothing to check yet."""
    manifest = find_manifest(build_dir)
    if manifest is not None:
        check_file_hashes(build_dir, manifest)


def verify(build_dir: str | Path, source=None, *, precision: str = "fp32", reporter=None, decode_steps: int = 8,
           greedy_tokens: int = 32, backends: Sequence[str] | None = None, providers: Sequence[str] | None = None,
           batch: int = 2, prompt_len: int = 12, seed: int = 0, report_dir: str | Path | None = None,
           quantization: dict | None = None) -> dict[str, Any]:
    """Compare the build's graphs/engines with the reference made from `source` (an open weight
    source, a checkpoint dir or a preset name; None: the one the manifest names). `backends`: the
    runners (verification.runners.RUNNERS). Writes report.json, report.md and error_per_step.png to
    `report_dir` (default BUILD_DIR/verify; there, a finished build's manifest.json is updated: the
    report files' hashes and the "verify" verdict). Returns {"passed", "checks" (without per-step
    figures and token lists), "report", "skipped"}."""
    build_dir = Path(build_dir)
    _check_build(build_dir)  # before any other work: what `run` refuses, verify refuses
    reporter = reporter or Reporter()
    ort.set_default_logger_severity(3)  # Polygraphy's sessions would warn of every TensorScatter not run in place
    if decode_steps < 1 or greedy_tokens < 1:
        raise ExportError("decode_steps and greedy_tokens must be >= 1")
    tolerance_for(precision, "logits")  # unknown precision: fail now
    stages = find_stages(build_dir)  # model.onnx, or the stages of a `--stages N` build
    for stage in stages:
        if not (build_dir / stage["file"]).is_file():
            raise ExportError(f"{build_dir / stage['file']}: no such graph (not a build directory?)")
    if source is None:
        source, _ = source_from_manifest(build_dir)
    elif isinstance(source, (str, Path)):
        source = open_source(source)
    providers = list(providers or [CPU])
    runners, skipped = _choose_runners(build_dir, backends)

    io = chain_io([graph_io(build_dir / s["file"]) for s in stages])
    mtp_io = graph_io(build_dir / MTP_GRAPH) if (build_dir / MTP_GRAPH).is_file() else None
    mla = "naive" if len(cache_layout(io, 0)[0]) == 2 else "absorbed"  # per-head K|V, or the latent row
    dtype = getattr(torch, REFERENCE_DTYPE.get(precision, "float32"))
    started = time.time()

    check_reference_fits(source.config)  # before loading it: one line instead of an allocation failure
    reporter.stage("verify: loading the reference")
    model = load_reference(source, dtype=dtype, mla=mla, mtp=mtp_io is not None)
    reporter.done("verify: loading the reference")
    if mtp_io is not None and not len(model.mtp):
        raise ExportError("the build has mtp.onnx but the source has no MTP layer")
    reference = ReferenceRunner(model, "model", name=REFERENCE)
    mtp_reference = ReferenceRunner(model, "mtp", name=REFERENCE) if mtp_io is not None else None
    if prompt_len + max(decode_steps, greedy_tokens) > model.cfg.max_seq_len:
        raise ExportError(f"prompt_len ({prompt_len}) + max(decode_steps, greedy_tokens) exceeds the model's "
                          f"context length ({model.cfg.max_seq_len})")
    prompt = np.random.default_rng(seed).integers(2, model.cfg.vocab_size, size=(batch, prompt_len), dtype=np.int64)

    advance = reporter.stage("verify: reference inputs", total=(decode_steps + 1) * (2 if mtp_io else 1))
    feeds, mtp_feeds = make_inputs(reference, io, prompt=prompt, decode_steps=decode_steps,
                                   mtp_reference=mtp_reference, mtp_io=mtp_io, advance=advance)
    reporter.done("verify: reference inputs")
    graphs = [(MAIN_GRAPH, reference, feeds, io)] + (
        [(MTP_GRAPH, mtp_reference, mtp_feeds, mtp_io)] if mtp_io is not None else [])
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        checks = _compare_graphs(build_dir, graphs, precision, runners, providers, reporter)
        checks += _greedy_checks(build_dir, model, prompt, precision, runners, providers, feeds, io,
                                 greedy_tokens, reporter)
        if quantization is None:
            found = find_manifest(build_dir)
            quantization = found.quantization if found is not None else None
        advance = reporter.stage("verify: language-model figures on real text", total=len(runners) + 1)
        checks += lm_checks(build_dir, source, model, precision, runners,
                            lambda b: runners_for(build_dir, MAIN_GRAPH, [b], providers, feeds)[0][1],
                            empty_past(io, 1, LM_SEQ), lambda key: tolerance_for(precision, key),
                            quantization=quantization, advance=advance)
        reporter.done("verify: language-model figures on real text")

    reporter.stage("verify: writing the report")
    passed = bool(checks) and all(c["passed"] for c in checks)
    report = {
        "passed": passed, "precision": precision, "reference_dtype": str(dtype).replace("torch.", ""),
        "source": _describe_source(source), "runners": [REFERENCE] + runners, "skipped": skipped,
        "providers": providers,
        "inputs": {"batch": batch, "prompt_len": prompt_len, "decode_steps": decode_steps,
                   "mtp_steps": len(mtp_feeds), "greedy_tokens": greedy_tokens, "seed": seed,
                   "prompt": prompt.tolist()},
        "tolerances": {k: asdict(v) for k, v in TOLERANCES[precision].items()},
        "checks": checks, "seconds": round(time.time() - started, 2), "tools": _tools(),
    }
    out_dir, in_build = _write_report(build_dir, report_dir, report, checks)
    reporter.done("verify: writing the report")
    compact = [{k: v for k, v in c.items() if k not in ("steps", "reference_tokens", "engine_tokens")}
               for c in checks]
    result = {"passed": passed, "checks": compact,
              "report": f"{REPORT_DIR}/{REPORT_JSON}" if in_build else str((out_dir / REPORT_JSON).resolve()),
              "skipped": skipped}
    if in_build:  # a finished build keeps a manifest that lists the new report files and the verdict
        update_manifest(build_dir, REPORT_DIR, {"verify": result})
    return result


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _tools() -> dict[str, str | None]:
    return {"polygraphy": _version("polygraphy"), "onnxruntime": _version("onnxruntime"), "torch": torch.__version__}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None
