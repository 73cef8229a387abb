"""The ONNX Runtime engine: sessions over the exported graphs, optimized as they load.

`prepare` (the build's engine step) has ONNX Runtime load and optimize each graph (model.onnx,
mtp.onnx) once, so a graph it cannot run fails the build, and records what it did in the manifest.
It writes nothing: a saved optimized graph would hold a second copy of every weight (ONNX Runtime
writes all of them when it saves one), twice the disk while it is written, for a session start it
shortens by about 0.1 s (measured on `small` int4-wo: 0.43 s from a saved graph, 0.54 s optimizing at
load; the same peak memory). `session` loads the exported graph and optimizes it online.

Why ORT_ENABLE_EXTENDED and not ORT_ENABLE_ALL: "all" adds layout optimizations (NCHWc blocking)
whose block size comes from the vector width of the CPU that runs the optimizer (AVX2 vs AVX-512).
The extended level (constant folding, redundant-node elimination, MatMul/LayerNorm/GELU fusions into
com.microsoft ops) gives the same graph on every x86 or Arm CPU. On another provider (CUDA),
ONNX Runtime assigns its fusions for that provider as it loads the graph.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from dsv3_export.core.build_dir import find_manifest
from dsv3_export.core.errors import ExportError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPTIMIZATION_LEVEL = "extended"
# The provider the build's engine step loads each graph on.
PREPARED_PROVIDERS = (CPU,)


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


def _open(path: Path, so: "ort.SessionOptions", providers: list[str]) -> "ort.InferenceSession":
    """An InferenceSession, or ExportError naming the graph (ORT raises its own exception types
    with a multi-line message)."""
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{path.name}: ONNX Runtime cannot load it: {first}") from e


def prepare(graphs: dict[str, Path]) -> dict:
    """Load and optimize each graph with ONNX Runtime (extended level, CPU provider), writing
    nothing; ExportError naming the graph when it cannot. Returns the manifest's "engine" entry."""
    started = time.time()
    loaded = {}
    for name, path in graphs.items():
        path = Path(path)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # A check, not a session that runs: without prepacking (the kernels' copies of their weights
        # in their own layouts) it holds almost nothing. Measured on a 0.6 GB int8 build: 0.05 GiB
        # and 0.1 s, against 0.86 GiB and 1.5 s with it.
        so.add_session_config_entry("session.disable_prepacking", "1")
        t0 = time.time()
        _open(path, so, list(PREPARED_PROVIDERS))
        loaded[name] = {"graph": path.name, "seconds": round(time.time() - t0, 2)}
    return {
        "kind": "onnxruntime",
        "onnxruntime": ort.__version__,
        "graph_optimization_level": OPTIMIZATION_LEVEL,
        "optimized": "at load",
        "providers": list(PREPARED_PROVIDERS),
        "graphs": loaded,
        "seconds": round(time.time() - started, 2),
    }


def session(build_dir: str | Path, graph: str = "model", providers: Iterable[str] | None = None,
            threads: int | None = None, spin: bool = True) -> "ort.InferenceSession":
    """An InferenceSession for one graph of a build ("model" or "mtp", or a stage graph), optimized
    as it loads (extended level). `threads`: intra-op threads (None: ONNX Runtime's default, one per
    physical core). `spin=False`: the intra-op threads sleep between runs instead of busy-waiting
    (for a session that alternates with another one, as the MTP graph does with the main graph in
    speculative decoding). The path loaded is in `session.dsv3_model_path`."""
    build_dir = Path(build_dir)
    providers = _check_providers(providers)
    path = _graph_path(build_dir, graph)
    if not path.is_file():
        raise ExportError(f"{path}: no such graph in the build directory")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if threads is not None:
        if threads < 0:
            raise ExportError(f"threads must be >= 0 (0 = ONNX Runtime's default), got {threads}")
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    manifest = find_manifest(build_dir)
    if manifest is not None and manifest.moe_form == "per-expert":
        # ONNX Runtime's static memory-reuse plan is quadratic in a graph's values: 2.9 s of session
        # start for `small`'s per-expert graph, 0.16 s without it (its arena still recycles memory
        # at run time; decode measured no slower, docs/performance.md).
        so.enable_mem_reuse = False
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = _open(path, so, providers)
    sess.dsv3_model_path = path
    return sess


def shared_value(array: np.ndarray) -> "ort.OrtValue":
    """An OrtValue over a C-contiguous numpy array's own memory (no copy): bound as both a graph's
    input and output, the graph writes into the array."""
    if not array.flags.c_contiguous:
        raise ValueError("shared_value needs a C-contiguous array")
    return ort.OrtValue.ortvalue_from_numpy(array)


def run_in_place(session, inputs: dict[str, np.ndarray], buffers: dict[str, np.ndarray],
                 outputs: Sequence[str]) -> list[np.ndarray]:
    """One run of `session` with each cache buffer (past name -> array) bound as both its past
    input and its present output (past_latent.X -> present_latent.X), so the graph's TensorScatter
    writes the new rows into the array itself; `inputs` are bound as they are, `outputs` come back
    as new arrays, in order. A session without I/O binding (TensorRT) runs normally and the presents
    are copied back into the buffers."""
    if not hasattr(session, "io_binding"):
        names = [o.name for o in session.get_outputs()]
        out = dict(zip(names, session.run(None, {**inputs, **buffers})))
        for past, b in buffers.items():
            b[...] = out[past.replace("past_", "present_", 1)]
        return [out[n] for n in outputs]
    binding = session.io_binding()
    for name, value in inputs.items():
        binding.bind_cpu_input(name, value)
    values = {name: shared_value(b) for name, b in buffers.items()}  # kept alive until the run returns
    for name, v in values.items():
        binding.bind_ortvalue_input(name, v)
        binding.bind_ortvalue_output(name.replace("past_", "present_", 1), v)
    for name in outputs:
        binding.bind_output(name)
    session.run_with_iobinding(binding)
    return [o.numpy() for o in binding.get_outputs()[-len(outputs):]]
