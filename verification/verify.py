"""Verification: the built graphs and engines against the PyTorch reference (DESIGN.md, "Verification").

Polygraphy's `Comparator` runs every runner on the same feed dicts and compares each runner's outputs
with the reference's, output by output:

- runners: `ReferenceRunner` (the PyTorch model behind the graph contract's names), "ort" (the ONNX
  Runtime engine as deployed: `engines.ort.session`, the saved optimized graph), "graph" (the raw
  exported graph in ONNX Runtime through Polygraphy's `SessionFromOnnx`), "trt" (Polygraphy's
  `TrtRunner` over the build's plan, engines.trt.polygraphy_runner; by default only where TensorRT
  works and the build has model.plan);
- inputs: a prefill (batch 2, a 12-token prompt, an empty past) and a chain of decode steps, each fed
  the REFERENCE's present latents and argmax token, so every runner sees identical inputs; the MTP
  graph gets tokens i+1 with the reference's h_i and its own reference latent chain;
- criteria: `TOLERANCES[precision]`, one entry per output (pattern); fp32 checks max|engine - ref|
  against `limit` x max|ref| for that step (a relative-to-max criterion; elementwise relative error
  explodes on values near 0);
- greedy: `greedy_tokens` tokens from the reference's `generate_greedy` against each backend driven
  with its own cache.

The report goes to BUILD_DIR/verify/: report.json (every check, every step's figures), report.md
(verdict, table, error plot) and error_per_step.png.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from polygraphy.backend.base import BaseRunner

from core.errors import ExportError
from verification.compare import CosineCompare, RelMaxCompare, step_figures
from verification.report import write_markdown, write_plot

REPORT_DIR = "verify"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_PNG = "error_per_step.png"
REFERENCE = "pytorch"
BACKENDS = ("ort", "graph", "trt")
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Tolerance:
    """One acceptance criterion. metric:
    - "rel_max": max|engine - ref| <= limit x max|ref| (per step, per output);
    - "greedy_prefix": the generated tokens agree with the reference's for at least limit x n tokens
      from the start (every row of the batch).
    - "cosine": cosine similarity of engine and reference output (flattened) >= limit, per step;
    - "lm_cosine" / "lm_top1" / "lm_kl": next-token figures over >= 256 positions of real text
      (exporter/lm_eval.py): mean logits cosine >= limit, top-1 agreement >= limit, mean
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


# ---- the reference runner ---------------------------------------------------------------------------
class ReferenceRunner(BaseRunner):
    """The PyTorch reference as a Polygraphy runner: the feed dict names of model.onnx (input_ids,
    past_latent.{i}) or mtp.onnx (input_ids, hidden_states, past_latent.mtp), the same output names,
    numpy in and out."""

    def __init__(self, model, graph: str = "model", name: str | None = None):
        super().__init__(name=name, prefix="pytorch-reference")
        if graph not in ("model", "mtp"):
            raise ValueError(f"graph must be 'model' or 'mtp', got {graph!r}")
        if graph == "mtp" and not len(model.mtp):
            raise ValueError("the reference model has no MTP layer")
        self.model, self.graph = model, graph

    def _cache_dims(self) -> tuple[int, ...]:
        from exporter.export import cache_width

        return cache_width(self.model.cfg, self.model.mla)

    def get_input_metadata_impl(self):
        import numpy as np
        from polygraphy.common import TensorMetadata

        cfg, width = self.model.cfg, self._cache_dims()
        meta = TensorMetadata()
        meta.add("input_ids", np.int64, ("batch", "seq"))
        if self.graph == "model":
            for i in range(cfg.n_layers):
                meta.add(f"past_latent.{i}", np.float32, ("batch", "past", *width))
        else:
            meta.add("hidden_states", np.float32, ("batch", "seq", cfg.dim))
            meta.add("past_latent.mtp", np.float32, ("batch", "past", *width))
        return meta

    def infer_impl(self, feed_dict):
        import torch

        dtype = self.model.dtype

        def tensor(name):
            t = torch.from_numpy(feed_dict[name].copy())
            return t if name == "input_ids" else t.to(dtype)

        def array(t):
            return t.detach().float().cpu().numpy()

        start = time.perf_counter()
        with torch.no_grad():
            ids = tensor("input_ids")
            if self.graph == "model":
                past = [tensor(f"past_latent.{i}") for i in range(self.model.cfg.n_layers)]
                out = self.model(ids, past)
                result = OrderedDict([("logits", array(out.logits)), ("hidden_states", array(out.hidden_states))])
                result.update((f"present_latent.{i}", array(p)) for i, p in enumerate(out.past))
            else:
                logits, present = self.model.mtp_forward(ids, tensor("hidden_states"), tensor("past_latent.mtp"))
                result = OrderedDict([("logits", array(logits)), ("present_latent.mtp", array(present))])
        self.inference_time = time.perf_counter() - start
        return result


# ---- inputs -----------------------------------------------------------------------------------------
def _present_to_past(name: str) -> str:
    return name.replace("present_latent", "past_latent", 1)


def _empty_past(io: dict, batch: int) -> dict:
    """Zero-length past inputs shaped from the graph's own I/O description."""
    import numpy as np

    out = {}
    for inp in io["inputs"]:
        if inp["name"].startswith("past_latent"):
            shape = [batch if i == 0 else 0 if i == 1 else int(d) for i, d in enumerate(inp["shape"])]
            out[inp["name"]] = np.zeros(shape, dtype=inp["dtype"])
    return out


def make_inputs(reference: ReferenceRunner, io: dict, *, prompt, decode_steps: int,
                mtp_reference: ReferenceRunner | None = None, mtp_io: dict | None = None,
                advance: Callable[[int], None] = lambda n=1: None):
    """The data loaders (lists of feed dicts): model.onnx prefill + `decode_steps` decode steps, each
    fed the reference's present latents and argmax token; and, given an MTP reference, the MTP chain
    over the same positions (input_ids = tokens i+1, hidden_states = the reference's h_i)."""
    import numpy as np

    batch = prompt.shape[0]
    feeds, mtp_feeds = [], []
    feed = {"input_ids": prompt.astype(np.int64), **_empty_past(io, batch)}
    mtp_past = _empty_past(mtp_io, batch) if mtp_reference is not None else None
    with reference:
        for step in range(decode_steps + 1):
            feeds.append(feed)
            out = reference.infer(feed)
            nxt = out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
            if mtp_reference is not None:
                ids = np.concatenate([feed["input_ids"][:, 1:], nxt], axis=1)
                mtp_feeds.append({"input_ids": ids, "hidden_states": _copy(out["hidden_states"])})
            feed = {"input_ids": nxt, **_present_to_past_dict(out)}
            advance(1)
    if mtp_reference is not None:
        with mtp_reference:
            for f in mtp_feeds:  # each step's past = the reference's present of the step before
                f.update(mtp_past)
                mtp_past = _present_to_past_dict(mtp_reference.infer(f))
                advance(1)
    return feeds, mtp_feeds


def _present_to_past_dict(out) -> dict:
    return {_present_to_past(k): _copy(v) for k, v in out.items() if k.startswith("present_latent")}


def _copy(a):
    import numpy as np

    return np.array(a, copy=True)


def _step_labels(feeds) -> list[dict]:
    labels = []
    for i, f in enumerate(feeds):
        past = next((v.shape[1] for k, v in f.items() if k.startswith("past_latent")), 0)
        labels.append({"step": i, "phase": "prefill" if i == 0 else "decode",
                       "seq": int(f["input_ids"].shape[1]), "past": int(past)})
    return labels


# ---- comparison -------------------------------------------------------------------------------------
def _compare_funcs(precision: str, outputs: Sequence[str]) -> list:
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


def _graph_checks(graph: str, precision: str, accuracy, labels: list[dict], runner_names: dict[str, str]) -> list[dict]:
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


# ---- runners ----------------------------------------------------------------------------------------
def tensorrt_available() -> tuple[bool, str]:
    try:
        from engines.trt import require_tensorrt

        require_tensorrt()
    except ExportError as e:
        return False, str(e).replace("--backend trt needs", "needs")
    return True, ""


def _trt_runner(build_dir: Path, graph: str, feeds: list[dict], name: str):
    """TensorRT through Polygraphy's TrtRunner (engines.trt.polygraphy_runner): the build's saved plan
    when it has one, else an engine built here from the ONNX; each feed runs in the optimization
    profile its shapes fit (prefill or decode)."""
    from engines.trt import polygraphy_runner

    return polygraphy_runner(build_dir, graph, name=name, feeds=feeds)


def _ort_engine_loader(build_dir: Path, graph: str, providers: list[str]):
    """The ONNX Runtime engine as `engines.ort.session` loads it (the saved optimized graph)."""
    from engines.ort import session

    return lambda: session(build_dir, graph[: -len(".onnx")], providers=providers)


def _runners(build_dir: Path, graph: str, backends: list[str], providers: list[str], feeds: list[dict]):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    runners = []
    for backend in backends:
        name = f"{backend}:{graph}"
        if backend == "ort":
            runners.append((backend, OnnxrtRunner(_ort_engine_loader(build_dir, graph, providers), name=name)))
        elif backend == "graph":
            runners.append((backend, OnnxrtRunner(SessionFromOnnx(str(build_dir / graph), providers=providers),
                                                  name=name)))
        elif backend == "trt":
            runners.append((backend, _trt_runner(build_dir, graph, feeds, name)))
    return runners


# ---- greedy -----------------------------------------------------------------------------------------
def runner_greedy(runner, prompt, max_new_tokens: int, empty_past: dict,
                  advance: Callable[[int], None] = lambda n=1: None):
    """Greedy continuation through any Polygraphy runner of model.onnx, driven with its own cache."""
    import numpy as np

    tokens = []
    feed = {"input_ids": prompt.astype(np.int64), **empty_past}
    with runner:
        for _ in range(max_new_tokens):
            out = runner.infer(feed)
            nxt = np.asarray(out["logits"])[:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(nxt)
            feed = {"input_ids": nxt, **{_present_to_past(k): np.array(v) for k, v in out.items()
                                         if k.startswith("present_latent")}}
            advance(1)
    return np.concatenate(tokens, axis=1)


def _greedy_check(backend: str, ref_tokens, tokens, tol: Tolerance) -> dict:
    n = ref_tokens.shape[1]
    agree = []
    for r, e in zip(ref_tokens, tokens):
        diff = [i for i in range(n) if r[i] != e[i]]
        agree.append(diff[0] if diff else n)
    fraction = min(agree) / n
    return {
        "name": f"greedy {n} tokens [{backend}]", "kind": "greedy", "graph": "model.onnx", "runner": backend,
        "metric": tol.metric, "tolerance": tol.limit, "passed": fraction >= tol.limit,
        "tokens": n, "agreement": fraction, "matching_prefix": agree,
        "first_divergence": [a if a < n else None for a in agree],
        "reference_tokens": ref_tokens.tolist(), "engine_tokens": tokens.tolist(),
    }


# ---- sources ----------------------------------------------------------------------------------------
def read_manifest(build_dir: str | Path) -> dict | None:
    path = Path(build_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def source_from_manifest(build_dir: str | Path, *, seed: int | None = None):
    """The weight source a build was made from, as its manifest names it: (open source, spec)."""
    from exporter.source import open_source

    manifest = read_manifest(build_dir)
    if manifest is None:
        raise ExportError(f"{build_dir}: no manifest.json (not a build directory?); give --source")
    src = manifest.get("source") or {}
    if src.get("kind") == "preset":
        return open_source(src["name"], seed=src.get("seed", 0) if seed is None else seed), src["name"]
    if src.get("kind") == "checkpoint":
        return open_source(src["path"]), src["path"]
    raise ExportError(f"{build_dir}/manifest.json: no usable \"source\" entry; give --source")


def _describe_source(source) -> dict:
    from exporter.checkpoint import Checkpoint

    if isinstance(source, Checkpoint):
        return {"kind": "checkpoint", "path": str(source.path), "fingerprint": source.fingerprint()}
    return {"kind": "preset", "seed": getattr(source, "seed", None)}


# ---- the entry point --------------------------------------------------------------------------------
def verify(build_dir: str | Path, source=None, *, precision: str = "fp32", reporter=None, decode_steps: int = 8,
           greedy_tokens: int = 32, backends: Sequence[str] | None = None, providers: Sequence[str] | None = None,
           batch: int = 2, prompt_len: int = 12, seed: int = 0, report_dir: str | Path | None = None,
           quantization: dict | None = None) -> dict[str, Any]:
    """Compare the build's graphs/engines with the reference made from `source` (an open weight
    source, a checkpoint dir or a preset name; None: the one the manifest names). Writes
    report.json, report.md and error_per_step.png to `report_dir` (default BUILD_DIR/verify; there,
    a finished build's manifest.json is updated: the report files' hashes and the "verify" verdict).
    Returns {"passed", "checks" (without per-step figures and token lists), "report", "skipped"}."""
    import numpy as np
    import torch
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    from exporter.source import load_reference, open_source
    from pipeline.build import Reporter, graph_io

    build_dir = Path(build_dir)
    reporter = reporter or Reporter()
    if decode_steps < 1 or greedy_tokens < 1:
        raise ExportError("decode_steps and greedy_tokens must be >= 1")
    tolerance_for(precision, "logits")  # unknown precision: fail now
    model_path = build_dir / "model.onnx"
    if not model_path.is_file():
        raise ExportError(f"{model_path}: no such graph (not a build directory?)")
    if source is None:
        source, _ = source_from_manifest(build_dir)
    elif isinstance(source, (str, Path)):
        source = open_source(source)
    providers = list(providers or [CPU])

    skipped = []
    if backends is None:
        backends = ["ort", "graph", "trt"]
        explicit = False
    else:
        backends, explicit = list(backends), True
    for b in backends:
        if b not in BACKENDS:
            raise ExportError(f"unknown verify backend {b!r} (choose from {', '.join(BACKENDS)})")
    if "ort" in backends:
        try:
            import engines.ort  # noqa: F401
        except ImportError:
            backends.remove("ort")
            skipped.append({"runner": "ort", "reason": "engines.ort is not available"})
    if "trt" in backends:
        ok, why = tensorrt_available()
        if ok and not explicit and not (build_dir / "model.plan").is_file():
            # An ORT build's graph may be lowered to ONNX Runtime-only ops; building an engine from it
            # is for an explicit --backend trt.
            ok, why = False, "the build has no TensorRT plan (model.plan); --backend trt builds one from the ONNX"
        if not ok:
            if explicit:
                raise ExportError(f"verify backend trt: {why}")
            backends.remove("trt")
            skipped.append({"runner": "trt", "reason": why})

    io = graph_io(model_path)
    mtp_path = build_dir / "mtp.onnx"
    mtp_io = graph_io(mtp_path) if mtp_path.is_file() else None
    past0 = next((i for i in io["inputs"] if i["name"] == "past_latent.0"), None)
    mla = "naive" if past0 is not None and len(past0["shape"]) == 4 else "absorbed"
    dtype = getattr(torch, REFERENCE_DTYPE.get(precision, "float32"))
    started = time.time()

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
    rng = np.random.default_rng(seed)
    prompt = rng.integers(2, model.cfg.vocab_size, size=(batch, prompt_len), dtype=np.int64)

    advance = reporter.stage("verify: reference inputs", total=(decode_steps + 1) * (2 if mtp_io else 1))
    feeds, mtp_feeds = make_inputs(reference, io, prompt=prompt, decode_steps=decode_steps,
                                   mtp_reference=mtp_reference, mtp_io=mtp_io, advance=advance)
    reporter.done("verify: reference inputs")

    checks: list[dict] = []
    graphs = [("model.onnx", reference, feeds, io)]
    if mtp_io is not None:
        graphs.append(("mtp.onnx", mtp_reference, mtp_feeds, mtp_io))
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        for graph, ref_runner, graph_feeds, graph_io_ in graphs:
            stage = f"verify: comparing {graph}"
            advance = reporter.stage(stage, total=len(backends) + 1)
            labels = _step_labels(graph_feeds)
            results = Comparator.run([ref_runner], data_loader=graph_feeds)
            advance(1)
            names = {}
            for backend in backends:
                try:  # a runner that cannot load or run the graph fails its check, with the reason
                    (_, runner), = _runners(build_dir, graph, [backend], providers, graph_feeds)
                    results.extend(Comparator.run([runner], data_loader=graph_feeds))
                    names[runner.name] = backend
                except Exception as e:
                    checks.append({"name": f"{graph} run [{backend}]", "kind": "error", "graph": graph,
                                   "runner": backend, "passed": False, "error": _one_line(e)})
                advance(1)
            if names:
                outputs = [o["name"] for o in graph_io_["outputs"]]
                funcs = _compare_funcs(precision, outputs)
                accuracy = Comparator.compare_accuracy(  # a list of compare funcs needs Polygraphy >= 0.50
                    results, comparisons=[(0, i) for i in range(1, len(names) + 1)],
                    compare_func=funcs[0] if len(funcs) == 1 else funcs)
                checks += _graph_checks(graph, precision, accuracy, labels, names)
            reporter.done(stage)

        greedy_backends = list(backends)
        advance = reporter.stage("verify: greedy continuations", total=greedy_tokens * (len(greedy_backends) + 1))
        with torch.no_grad():
            ref_tokens = model.generate_greedy(torch.from_numpy(prompt), greedy_tokens).numpy()
        advance(greedy_tokens)
        tol = tolerance_for(precision, "greedy")
        for backend in greedy_backends:
            try:
                (_, runner), = _runners(build_dir, "model.onnx", [backend], providers, feeds)
                tokens = runner_greedy(runner, prompt, greedy_tokens, _empty_past(io, batch), advance)
                checks.append(_greedy_check(backend, ref_tokens, tokens, tol))
            except Exception as e:
                checks.append({"name": f"greedy {greedy_tokens} tokens [{backend}]", "kind": "error",
                               "graph": "model.onnx", "runner": backend, "passed": False,
                               "error": _one_line(e)})
        reporter.done("verify: greedy continuations")

        from verification.lm_eval import lm_checks

        if quantization is None:
            quantization = (read_manifest(build_dir) or {}).get("quantization")
        advance = reporter.stage("verify: language-model figures on real text", total=len(backends) + 1)
        checks += lm_checks(build_dir, source, model, precision, backends,
                            lambda b: _runners(build_dir, "model.onnx", [b], providers, feeds)[0][1],
                            _empty_past(io, 1), lambda key: tolerance_for(precision, key),
                            quantization=quantization, advance=advance)
        reporter.done("verify: language-model figures on real text")

    reporter.stage("verify: writing the report")
    in_build = report_dir is None or Path(report_dir).resolve() == (build_dir / REPORT_DIR).resolve()
    out_dir = build_dir / REPORT_DIR if in_build else Path(report_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    passed = bool(checks) and all(c["passed"] for c in checks)
    report = {
        "passed": passed, "precision": precision, "reference_dtype": str(dtype).replace("torch.", ""),
        "source": _describe_source(source), "runners": [REFERENCE] + list(backends), "skipped": skipped,
        "providers": providers,
        "inputs": {"batch": batch, "prompt_len": prompt_len, "decode_steps": decode_steps,
                   "mtp_steps": len(mtp_feeds), "greedy_tokens": greedy_tokens, "seed": seed,
                   "prompt": prompt.tolist()},
        "tolerances": {k: asdict(v) for k, v in TOLERANCES[precision].items()},
        "checks": checks, "seconds": round(time.time() - started, 2),
        "tools": {"polygraphy": _version("polygraphy"), "onnxruntime": _version("onnxruntime"),
                  "torch": torch.__version__},
    }
    plot = write_plot(checks, out_dir / PLOT_PNG)
    report["plot"] = f"{REPORT_DIR}/{PLOT_PNG}" if plot else None
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out_dir / REPORT_MD, plot)
    reporter.done("verify: writing the report")
    compact = [{k: v for k, v in c.items() if k not in ("steps", "reference_tokens", "engine_tokens")}
               for c in checks]
    result = {"passed": passed, "checks": compact,
              "report": f"{REPORT_DIR}/{REPORT_JSON}" if in_build else str((out_dir / REPORT_JSON).resolve()),
              "skipped": skipped}
    if in_build:
        _update_manifest(build_dir, out_dir, result)
    return result


def _update_manifest(build_dir: Path, out_dir: Path, result: dict) -> None:
    """A finished build keeps a consistent manifest after a new verification: the verify/ files' entries
    (engines.load checks every listed file's sha256) and the verdict. Nothing to do inside `build`,
    which writes the manifest after verifying."""
    from pipeline.build import MANIFEST, sha256_file

    path = build_dir / MANIFEST
    manifest = read_manifest(build_dir)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return
    prefix = f"{REPORT_DIR}/"
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(prefix)}
    for f in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        files[f.relative_to(build_dir).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest["files"] = dict(sorted(files.items()))
    manifest["verify"] = result
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None
