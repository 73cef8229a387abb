"""The ONNX Runtime engine: the exported graphs, optimized once at build time and saved.

`prepare` runs ONNX Runtime's graph optimizer over each graph (model.onnx, mtp.onnx) and saves the
result next to it (model.ort.onnx with its weights in model.ort.onnx.data), so every later load
skips optimization: `session` loads that file with optimizations off. Without it, the raw graph is
loaded and optimized online, as usual.

Why ORT_ENABLE_EXTENDED and not ORT_ENABLE_ALL: "all" adds layout optimizations (NCHWc blocking)
whose block size comes from the vector width of the CPU that runs the optimizer (AVX2 vs AVX-512),
so a model saved with them is tied to that CPU, and ONNX Runtime warns against saving it. The
extended level (constant folding, redundant-node elimination, MatMul/LayerNorm/GELU fusions into
com.microsoft ops) gives the same graph on every x86 or Arm CPU, so the saved file can be copied
with the build directory. The optimization runs on the CPU provider: fusions are assigned per
provider, so the saved file is the CPU engine; a session on another provider (CUDA) loads the raw
graph and lets ONNX Runtime optimize it for that provider online.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from core.errors import ExportError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPTIMIZATION_LEVEL = "extended"
OPTIMIZED_SUFFIX = ".ort.onnx"
# Initializers at least this large go to the external data file; small ones (shapes, scalars,
# norms) stay in the graph where the optimizer folded them.
EXTERNAL_MIN_BYTES = 1024
# The providers the saved (offline-optimized) graphs were optimized for.
PREPARED_PROVIDERS = (CPU,)


def optimized_name(graph: str) -> str:
    """model.onnx -> model.ort.onnx (its weights: model.ort.onnx.data)."""
    stem = graph[: -len(".onnx")] if graph.endswith(".onnx") else graph
    return stem + OPTIMIZED_SUFFIX


@contextlib.contextmanager
def _quiet():
    """Silence ONNX Runtime while probing providers: its C++ logger writes errors to fd 2 and its
    Python fallback path prints to stdout, whatever the log level."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        devnull = None
    try:
        if devnull is not None:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                    os.dup2(devnull, fd)
                except OSError:
                    pass
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        if devnull is not None:
            os.close(devnull)


def _probe_model() -> bytes:
    """A one-node graph (Identity) to test-load a provider with."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@functools.lru_cache(maxsize=None)
def _provider_loads(provider: str) -> bool:
    if provider == CPU:
        return True
    if provider not in ort.get_available_providers():
        return False
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        with _quiet():
            sess = ort.InferenceSession(_probe_model(), so, providers=[provider, CPU])
            return provider in sess.get_providers()
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def available_providers() -> tuple[str, ...]:
    """The execution providers that really work here, best first: TensorRT and CUDA only when their
    libraries load and a device answers (ONNX Runtime lists them whenever the wheel has them),
    CPU always. Probed once per process, silently."""
    listed = ort.get_available_providers()
    return tuple(p for p in (TENSORRT, CUDA) if p in listed and _provider_loads(p)) + (CPU,)


def default_providers() -> list[str]:
    """What an "ort" engine runs on when not told: CUDA when it works, else the CPU. (ORT's TensorRT
    provider is left out: TensorRT engines are the "trt" backend's business.)"""
    return [CUDA, CPU] if CUDA in available_providers() else [CPU]


def _check_providers(providers: Iterable[str] | None) -> list[str]:
    if providers is None:
        return default_providers()
    providers = list(providers)
    if not providers:
        raise ExportError("no execution provider given")
    working = available_providers()
    for p in providers:
        if p not in working:
            raise ExportError(f"execution provider {p} does not work on this machine "
                              f"(working: {', '.join(working)})")
    return providers


def _graph_path(build_dir: Path, graph: str) -> Path:
    return build_dir / (graph if graph.endswith(".onnx") else f"{graph}.onnx")


def prepare(build_dir: str | Path, graphs: dict[str, Path]) -> dict:
    """Optimize each graph with ONNX Runtime (extended level, CPU provider) and save the result next
    to it, weights in external data. Returns the manifest's "engine" entry."""
    build_dir = Path(build_dir)
    started = time.time()
    saved = {}
    for name, path in graphs.items():
        path = Path(path)
        out = build_dir / optimized_name(path.name)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(out)
        # Relative to the optimized model's folder.
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    str(EXTERNAL_MIN_BYTES))
        t0 = time.time()
        try:
            ort.InferenceSession(str(path), so, providers=list(PREPARED_PROVIDERS))
        except Exception as e:  # ORT raises its own exception types with a multi-line message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{path.name}: ONNX Runtime cannot load it: {first}") from e
        files = [out.name] + ([out.name + ".data"] if (build_dir / (out.name + ".data")).is_file() else [])
        saved[name] = {"optimized": out.name, "files": files, "seconds": round(time.time() - t0, 2)}
    return {
        "kind": "onnxruntime",
        "onnxruntime": ort.__version__,
        "graph_optimization_level": OPTIMIZATION_LEVEL,
        "providers": list(PREPARED_PROVIDERS),
        "graphs": saved,
        "seconds": round(time.time() - started, 2),
    }


def session(build_dir: str | Path, graph: str = "model", providers: Iterable[str] | None = None,
            threads: int | None = None, spin: bool = True) -> "ort.InferenceSession":
    """An InferenceSession for one graph of a build ("model" or "mtp"). Loads the saved optimized
    graph (optimizations off: they are already applied) when it exists and the providers are the
    ones it was optimized for; otherwise the raw graph, optimized online. `threads`: intra-op
    threads (None: ONNX Runtime's default, one per physical core). `spin=False`: the intra-op
    threads sleep between runs instead of busy-waiting (for a session that alternates with another
    one, as the MTP graph does with the main graph in speculative decoding). The path loaded is in
    `session.dsv3_model_path`."""
    build_dir = Path(build_dir)
    providers = _check_providers(providers)
    raw = _graph_path(build_dir, graph)
    optimized = build_dir / optimized_name(raw.name)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads is not None:
        if threads < 0:
            raise ExportError(f"threads must be >= 0 (0 = ONNX Runtime's default), got {threads}")
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized.is_file() and tuple(providers) == PREPARED_PROVIDERS:
        path = optimized
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif raw.is_file():
        path = raw
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    else:
        raise ExportError(f"{raw}: no such graph in the build directory")
    try:
        sess = ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path.name}: ONNX Runtime cannot load it: {first}") from e
    sess.dsv3_model_path = path
    return sess


def shared_value(array: np.ndarray) -> "ort.OrtValue":
    """An OrtValue over a C-contiguous numpy array's own memory (no copy): bound as both a graph's
    input and output, the graph writes into the array."""
    if not array.flags.c_contiguous:
        raise ValueError("shared_value needs a C-contiguous array")
    return ort.OrtValue.ortvalue_from_numpy(array)
