"""TensorRT engines. Needs TensorRT >= 10.15, Triton and an NVIDIA GPU; everything else in the project
works without them, and asking for this backend where they are missing fails at once with one line.

Build (`prepare`): each graph is parsed by Polygraphy's `NetworkFromOnnxPath` after the dsv3
plugins are registered, so every node carrying plugin_namespace="dsv3" becomes a plugin layer
instead of its ONNX function body; the network is strongly typed (TensorRT 11 knows no other kind,
and precision lives in the graph's Q/DQ nodes, docs/design.md "Precisions"). One plan per graph
(model.plan, mtp.plan) with a prefill and a decode optimization profile; profiles.json records
each profile's min/opt/max shape per input; timing.cache keeps the tactic timings for rebuilds.

Run (`TrtSession`): the `run(output_names, feeds)` interface of onnxruntime.InferenceSession, so
engines.runtime.Engine treats both backends alike; `polygraphy_runner` is the same plan in
Polygraphy's TrtRunner for verification/verify.py. Both pick, per call, the profile the input shapes
fit, switching only when it changes.

The shape and profile logic is engines/trt_profiles.py (pure Python, re-exported here); this
module holds the thin TensorRT calls.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from dsv3_export.core.build_dir import graph_io, read_manifest
from dsv3_export.core.errors import ExportError
from dsv3_export.engines.trt_profiles import (  # noqa: F401  re-exported: the backend's pure logic
    ATTENTION_IMPLS,
    DEFAULT_DECODE_SEQ,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_PREFILL,
    DEFAULT_MAX_SEQ_LEN,
    DEFAULT_OPT_PREFILL,
    DEFAULT_WORKSPACE_GIB,
    DIM_ROLES,
    PLAN_SUFFIX,
    PROFILE_NAMES,
    PROFILES_FILE,
    PROFILES_FORMAT,
    TIMING_CACHE,
    TrtOptions,
    check_portable,
    check_profiles_match,
    count_dsv3_nodes,
    describe_profile,
    dim_ranges,
    load_profiles,
    make_profiles,
    manifest_entry,
    plan_name,
    polygraphy_profiles,
    profiles_document,
    select_profile,
)
from dsv3_export.plugins.latent_attention.tensorrt import register as register_attention
from dsv3_export.plugins.moe_dispatch.tensorrt import register as register_moe
from dsv3_export.plugins.trt_common import TRT_TO_TORCH, dtype_name

MIN_TENSORRT = (10, 15)


def require_tensorrt():
    """The tensorrt module, or an ExportError naming what is missing (TensorRT, a GPU, Triton)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise ExportError("--backend trt needs TensorRT >= 10.15 (pip install tensorrt on a machine with an "
                          "NVIDIA GPU); it is not installed here") from None
    major, minor = (int(p) for p in trt.__version__.split(".")[:2])
    if (major, minor) < MIN_TENSORRT:
        raise ExportError(f"--backend trt needs TensorRT >= 10.15, found {trt.__version__}")
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        raise ExportError("--backend trt needs an NVIDIA GPU; none is visible (torch.cuda.is_available() is False)")
    try:
        import triton  # noqa: F401  the dsv3 plugins' kernels (AOT at build time, JIT at run time)
    except ImportError:
        raise ExportError("--backend trt needs Triton for the dsv3 TensorRT plugins (pip install triton)") from None
    return trt


# ---- TensorRT: registration and build ----------------------------------------------------------------
def register_plugins(attention_impl: str = "aot") -> None:
    """Define the dsv3 plugins in tensorrt.plugin's registry (before parsing or deserializing)."""
    try:
        register_attention(attention_impl)
        register_moe("jit")
    except (RuntimeError, ValueError) as e:  # e.g. already registered with the other impl
        raise ExportError(f"TensorRT plugins: {e}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def build_plan(onnx_path: str | Path, profiles: Sequence[Mapping[str, Any]], options: TrtOptions, *,
               timing_cache: str | Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Parse, check the plugin layers, build. Returns (serialized plan, facts for the manifest)."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER


    onnx_path = Path(onnx_path)
    check_portable(onnx_path)
    register_plugins(options.attention_impl)
    nodes = count_dsv3_nodes(onnx_path)
    cache = str(timing_cache) if timing_cache is not None else None
    config = CreateConfig(
        profiles=polygraphy_profiles(profiles),
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(options.workspace_gib * 2**30)},
        load_timing_cache=cache if cache is not None and Path(cache).is_file() else None,
        builder_optimization_level=options.optimization_level,
    )
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)()
            # By type name: PLUGIN_V3 for tensorrt.plugin ops; the name check also survives enum renames.
            plugin_layers = sum(1 for i in range(network.num_layers)
                                if dtype_name(network.get_layer(i).type).startswith("PLUGIN"))
            if options.require_plugins and plugin_layers != sum(nodes.values()):
                raise ExportError(
                    f"{onnx_path.name}: TensorRT made {plugin_layers} plugin layers for {sum(nodes.values())} dsv3 "
                    f"nodes ({', '.join(f'{k} x{v}' for k, v in sorted(nodes.items()))}); the others were inlined "
                    "from their ONNX function bodies (plugins not registered, or a parser that ignores "
                    "plugin_namespace; see docs/tensorrt.md)")
            started = time.time()
            plan = EngineBytesFromNetwork((builder, network, parser), config=config, save_timing_cache=cache)()
    except PolygraphyException as e:
        raise ExportError(f"{onnx_path.name}: TensorRT could not build it: {_first_line(e)} "
                          "(the TensorRT log above says more)") from e
    return plan, {"plugin_layers": plugin_layers, "dsv3_nodes": nodes, "seconds": round(time.time() - started, 2)}


def prepare(build_dir: str | Path, graphs: Mapping[str, str | Path], options: TrtOptions) -> dict[str, Any]:
    """Build a plan per graph into `build_dir` (model.plan, mtp.plan), with profiles.json and
    timing.cache next to them. `options` must be resolved against the model (TrtOptions.resolve).
    Returns the manifest's "engine" entry."""
    trt = require_tensorrt()

    if not options.resolved:
        raise ValueError("prepare needs TrtOptions resolved against the model config (TrtOptions.resolve)")
    build_dir = Path(build_dir)
    started = time.time()
    cache = build_dir / TIMING_CACHE
    tables, built = {}, {}
    for name, path in graphs.items():
        path = Path(path)
        profiles = make_profiles(graph_io(path)["inputs"], options)
        plan, facts = build_plan(path, profiles, options, timing_cache=cache)
        out = build_dir / plan_name(path.name)
        with open(out, "wb") as f:
            f.write(plan)
        tables[out.name] = {"graph": path.name, "profiles": profiles}
        built[name] = {"plan": out.name, "files": [out.name], "profiles": [p["name"] for p in profiles], **facts}
    (build_dir / PROFILES_FILE).write_text(json.dumps(profiles_document(options, tables), indent=2) + "\n")
    for lock in build_dir.glob("*.lock"):  # Polygraphy's timing-cache lock files are not part of the build
        lock.unlink(missing_ok=True)
    import torch

    props = torch.cuda.get_device_properties(0)
    return manifest_entry(options, built, tensorrt_version=trt.__version__,
                          device=f"{props.name} (sm_{props.major}{props.minor})", seconds=time.time() - started)


# ---- TensorRT: running a plan ----------------------------------------------------------------------------
def engine_profiles(engine, input_names: Iterable[str]) -> list[dict[str, Any]]:
    """The profiles a deserialized engine really has, in our dict form (names unknown: profile i)."""
    out = []
    for i in range(engine.num_optimization_profiles):
        inputs = {}
        for name in input_names:
            lo, opt, hi = engine.get_tensor_profile_shape(name, i)
            inputs[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}
        out.append({"name": f"profile {i}", "inputs": inputs})
    return out


def _torch_dtype(trt_dtype):
    import torch

    name = dtype_name(trt_dtype)
    if name not in TRT_TO_TORCH:
        raise ExportError(f"the engine has a {name} input or output; dsv3-export cannot feed it")
    return getattr(torch, TRT_TO_TORCH[name])


def _to_device(value, dtype):
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device="cuda", dtype=dtype).contiguous()
    arr = np.ascontiguousarray(value)
    if arr.dtype.name == "bfloat16":  # ml_dtypes: torch has no numpy bridge for it
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16).to("cuda")
    return torch.from_numpy(arr).to(device="cuda", dtype=dtype)


def _to_numpy(t):
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    return t.cpu().numpy()


class _Meta:
    """Stands in for onnxruntime's NodeArg in get_inputs()/get_outputs()."""

    def __init__(self, name: str, shape, dtype):
        self.name, self.shape, self.type = name, shape, str(dtype)


def _load_engine(plan_path: Path, attention_impl: str):
    """A deserialized engine through Polygraphy's loaders (as verification uses them), plugins first."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    register_plugins(attention_impl)
    try:
        with G_LOGGER.verbosity(G_LOGGER.WARNING):
            return EngineFromBytes(BytesFromPath(str(plan_path)))()
    except PolygraphyException as e:
        raise ExportError(f"{plan_path}: TensorRT cannot load it ({_first_line(e)}); a plan runs only with the "
                          "TensorRT version and GPU model that built it, rebuild it here") from e


class TrtSession:
    """A plan behind onnxruntime.InferenceSession's interface: `run(output_names, feeds)` -> list of
    numpy arrays, get_inputs(), get_outputs(), get_providers(). `run_device` takes numpy arrays or
    torch tensors and returns torch CUDA tensors, ready once `self.stream` gets there (use them on
    another stream after `wait_stream(session.stream)`); run() synchronizes."""

    def __init__(self, plan_path: str | Path, *, profiles: Sequence[Mapping[str, Any]] | None = None,
                 attention_impl: str = "aot", name: str | None = None):
        trt = require_tensorrt()
        import torch

        self.dsv3_model_path = Path(plan_path)
        self.name = name or self.dsv3_model_path.stem
        self.engine = _load_engine(self.dsv3_model_path, attention_impl)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        actual = engine_profiles(self.engine, self.input_names)
        if profiles is not None:
            check_profiles_match(profiles, actual, str(self.dsv3_model_path))
        self.profiles = list(profiles) if profiles is not None else actual
        self._dtypes = {n: _torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        self._shapes = {n: tuple(self.engine.get_tensor_shape(n)) for n in names}
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise ExportError(f"{self.dsv3_model_path}: TensorRT could not create an execution context "
                              "(out of GPU memory?)")
        self.stream = torch.cuda.Stream()
        # TensorRT refuses a null address even for an empty tensor (the prefill's past): give those
        # a real one.
        self._scratch = torch.empty(256, dtype=torch.uint8, device="cuda")
        self._active: int | None = None
        self._version = trt.__version__

    def get_inputs(self) -> list[_Meta]:
        return [_Meta(n, self._shapes[n], self._dtypes[n]) for n in self.input_names]

    def get_outputs(self) -> list[_Meta]:
        return [_Meta(n, self._shapes[n], self._dtypes[n]) for n in self.output_names]

    def get_providers(self) -> list[str]:
        return [f"TensorRT {self._version}"]

    def run_device(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ExportError(f"{self.name}: missing input(s) {', '.join(missing)}")
        shapes = {n: tuple(int(d) for d in feeds[n].shape) for n in feeds}
        index = select_profile(self.profiles, shapes, self.name)
        ctx, handle = self.context, self.stream.cuda_stream
        self.stream.wait_stream(torch.cuda.current_stream())  # CUDA tensors fed from the caller's stream
        with torch.cuda.stream(self.stream):  # allocations and copies ordered with the engine's work
            if index != self._active:
                if not ctx.set_optimization_profile_async(index, handle):
                    raise ExportError(f"{self.name}: TensorRT refused optimization profile {index}")
                self._active = index
            inputs = {}
            for n in self.input_names:
                t = inputs[n] = _to_device(feeds[n], self._dtypes[n])
                if not ctx.set_input_shape(n, shapes[n]):
                    raise ExportError(f"{self.name}: TensorRT refused shape {list(shapes[n])} for {n}")
                ctx.set_tensor_address(n, t.data_ptr() if t.numel() else self._scratch.data_ptr())
            outputs = {}
            for n in self.output_names:
                shape = tuple(ctx.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise ExportError(f"{self.name}: TensorRT cannot infer the shape of {n} from the inputs")
                t = outputs[n] = torch.empty(shape, dtype=self._dtypes[n], device="cuda")
                ctx.set_tensor_address(n, t.data_ptr() if t.numel() else self._scratch.data_ptr())
            if not ctx.execute_async_v3(handle):
                raise ExportError(f"{self.name}: TensorRT failed to run the engine (see its log above)")
        return outputs

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, Any]) -> list:
        names = list(output_names) if output_names else self.output_names
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise ExportError(f"{self.name}: no output(s) {', '.join(unknown)}")
        outputs = self.run_device(feeds)
        self.stream.synchronize()
        return [_to_numpy(outputs[n]) for n in names]

    def __repr__(self) -> str:
        return f"TrtSession({str(self.dsv3_model_path)!r}, profiles={[p.get('name') for p in self.profiles]})"


def _graph_plan(build_dir: Path, graph: str) -> tuple[Path, dict[str, Any] | None, str]:
    """(plan path, its profile table or None, LatentAttention impl) of one graph of a build."""
    graph = graph if graph.endswith(".onnx") else f"{graph}.onnx"
    plan = build_dir / plan_name(graph)
    doc = load_profiles(build_dir)
    entry = (doc or {}).get("engines", {}).get(plan.name)
    impl = (doc or {}).get("options", {}).get("attention_impl", "aot")
    return plan, entry, impl


def session(build_dir: str | Path, graph: str = "model") -> TrtSession:
    """A TrtSession for one graph of a TensorRT build ("model" or "mtp")."""
    require_tensorrt()
    build_dir = Path(build_dir)
    plan, entry, impl = _graph_plan(build_dir, graph)
    if not plan.is_file():
        raise ExportError(f"{build_dir}: this build has no TensorRT engine ({plan.name}); make one with "
                          f"dsv3-export build SOURCE -o OUT --backend trt")
    return TrtSession(plan, profiles=entry["profiles"] if entry else None, attention_impl=impl,
                      name=plan.stem)


# ---- Polygraphy runner (verification/runners.py) -----------------------------------------------------------------
_RUNNER_CLASS = None
_BUILT: dict[tuple, Any] = {}  # (onnx path, profiles) -> plan bytes: verification builds a graph once


def _runner_class():
    """Polygraphy's TrtRunner, switching to the profile that fits each feed before inferring."""
    global _RUNNER_CLASS
    if _RUNNER_CLASS is None:
        from polygraphy.backend.trt import TrtRunner

        class ProfiledTrtRunner(TrtRunner):
            def __init__(self, engine, profiles, *, name=None, graph="model"):
                super().__init__(engine, name=name)
                self.dsv3_profiles, self.dsv3_graph = profiles, graph
                self._dsv3_state = (None, None)  # (context, profile index) last set

            def infer(self, feed_dict, *args, **kwargs):
                ctx = getattr(self, "context", None)
                if ctx is not None:
                    if self.dsv3_profiles is None:
                        self.dsv3_profiles = engine_profiles(self.engine, list(feed_dict))
                    shapes = {n: tuple(int(d) for d in v.shape) for n, v in feed_dict.items()}
                    index = select_profile(self.dsv3_profiles, shapes, self.dsv3_graph)
                    if self._dsv3_state[0] is not ctx or self._dsv3_state[1] != index:
                        self.set_profile(index)
                        # A new profile forgets the input shapes; TrtRunner only sets those it sees change.
                        for n, shape in shapes.items():
                            ctx.set_input_shape(n, shape)
                        self._dsv3_state = (ctx, index)
                return super().infer(feed_dict, *args, **kwargs)

        _RUNNER_CLASS = ProfiledTrtRunner
    return _RUNNER_CLASS


def _model_max_seq_len(build_dir: Path) -> int:
    try:
        return int(read_manifest(build_dir).config["max_seq_len"])
    except (ExportError, ValueError, KeyError, TypeError):
        return DEFAULT_MAX_SEQ_LEN


def polygraphy_runner(build_dir: str | Path, graph: str, *, name: str | None = None,
                      feeds: Sequence[Mapping[str, Any]] = ()):
    """A Polygraphy TrtRunner for one graph of a build: over its plan (EngineFromBytes(BytesFromPath))
    when it has one, else over an engine built here from the ONNX with default options, big enough
    for `feeds`. Each inference runs in the profile its shapes fit (prefill or decode)."""
    require_tensorrt()
    from polygraphy.backend.trt import EngineFromBytes

    build_dir = Path(build_dir)
    plan, entry, impl = _graph_plan(build_dir, graph)
    stem = plan.stem
    if plan.is_file():
        profiles = entry["profiles"] if entry else None
        loader = lambda: _load_engine(plan, impl)  # noqa: E731
    else:

        onnx_path = build_dir / (graph if graph.endswith(".onnx") else f"{graph}.onnx")
        batch = max([DEFAULT_MAX_BATCH] + [int(f["input_ids"].shape[0]) for f in feeds if "input_ids" in f])
        options = TrtOptions(max_batch=batch).resolve(_model_max_seq_len(build_dir))
        profiles = make_profiles(graph_io(onnx_path)["inputs"], options)

        def loader():
            key = (str(onnx_path.resolve()), json.dumps(profiles))
            if key not in _BUILT:
                _BUILT[key] = build_plan(onnx_path, profiles, options)[0]
            return EngineFromBytes(_BUILT[key])()
    cache = {}

    def engine():
        if "engine" not in cache:
            cache["engine"] = loader()
        return cache["engine"]

    return _runner_class()(engine, profiles, name=name, graph=stem)
