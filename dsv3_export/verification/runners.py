"""The runners verification compares: the PyTorch reference behind the graph contract's names, and
the built graphs in ONNX Runtime (the deployed engine, or the raw exported graph) and TensorRT, all
as Polygraphy runners; plus the greedy continuation any of them gives with its own cache."""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata

import dsv3_export.engines.ort as ort_engine
import dsv3_export.engines.trt as trt_engine
from dsv3_export.core.build_dir import MAIN_GRAPH, find_stages, takes_buffers
from dsv3_export.core.errors import ExportError
from dsv3_export.engines.kv_cache import zero_cache
from dsv3_export.engines.stages import StagedSession
from dsv3_export.exporter.export import cache_width

RUNNERS = ("ort", "graph", "trt")  # what `verify --runner` takes: engines and the raw graph
CPU = "CPUExecutionProvider"


def present_to_past(name: str) -> str:
    return name.replace("present_latent", "past_latent", 1)


def empty_past(io: dict, batch: int, capacity: int = 0) -> dict:
    """The cache inputs of a first call, shaped from the graph's own I/O description: zero-length
    prefixes, or (graph contract v2) zeroed buffers of `capacity` positions and cache_lengths 0."""
    buffered = takes_buffers(io)
    out = {"cache_lengths": np.zeros(batch, np.int64)} if buffered else {}
    for inp in io["inputs"]:
        if inp["name"].startswith("past_latent"):
            row = tuple(int(d) for d in inp["shape"][2:])
            out[inp["name"]], = zero_cache(1, batch, capacity if buffered else 0, row, inp["dtype"])
    return out


def next_feed(feed: dict, out: dict, input_ids: np.ndarray) -> dict:
    """The feed after `feed` gave `out`: the new tokens, the presents as pasts, lengths advanced."""
    nxt = {"input_ids": input_ids, **{present_to_past(k): np.array(v, copy=True) for k, v in out.items()
                                      if k.startswith("present_latent")}}
    if "cache_lengths" in feed:
        nxt["cache_lengths"] = feed["cache_lengths"] + feed["input_ids"].shape[1]
    return nxt


class ReferenceRunner(BaseRunner):
    """The PyTorch reference as a Polygraphy runner: the feed dict names of model.onnx (input_ids,
    [cache_lengths,] past_latent.{i}) or mtp.onnx (input_ids, hidden_states, [cache_lengths,]
    past_latent.mtp), the same output names, numpy in and out. Absorbed MLA takes cache buffers and
    their lengths (graph contract v2), naive MLA prefixes."""

    def __init__(self, model, graph: str = "model", name: str | None = None):
        super().__init__(name=name, prefix="pytorch-reference")
        if graph not in ("model", "mtp"):
            raise ValueError(f"graph must be 'model' or 'mtp', got {graph!r}")
        if graph == "mtp" and not len(model.mtp):
            raise ValueError("the reference model has no MTP layer")
        self.model, self.graph = model, graph

    def _cache_dims(self) -> tuple[int, ...]:
        return cache_width(self.model.cfg, self.model.mla)

    def get_input_metadata_impl(self):
        cfg, width = self.model.cfg, self._cache_dims()
        meta = TensorMetadata()
        meta.add("input_ids", np.int64, ("batch", "seq"))
        if self.model.mla == "absorbed":
            meta.add("cache_lengths", np.int64, ("batch",))
        if self.graph == "model":
            for i in range(cfg.n_layers):
                meta.add(f"past_latent.{i}", np.float32, ("batch", "past", *width))
        else:
            meta.add("hidden_states", np.float32, ("batch", "seq", cfg.dim))
            meta.add("past_latent.mtp", np.float32, ("batch", "past", *width))
        return meta

    def infer_impl(self, feed_dict):
        dtype = self.model.dtype

        def tensor(name):
            t = torch.from_numpy(feed_dict[name].copy())
            return t if name in ("input_ids", "cache_lengths") else t.to(dtype)

        def array(t):
            return t.detach().float().cpu().numpy()

        start = time.perf_counter()
        with torch.no_grad():
            ids = tensor("input_ids")
            lengths = tensor("cache_lengths") if "cache_lengths" in feed_dict else None
            if self.graph == "model":
                past = [tensor(f"past_latent.{i}") for i in range(self.model.cfg.n_layers)]
                out = self.model(ids, past, lengths)
                result = OrderedDict([("logits", array(out.logits)), ("hidden_states", array(out.hidden_states))])
                result.update((f"present_latent.{i}", array(p)) for i, p in enumerate(out.past))
            else:
                logits, present = self.model.mtp_forward(ids, tensor("hidden_states"), tensor("past_latent.mtp"),
                                                         cache_lengths=lengths)
                result = OrderedDict([("logits", array(logits)), ("present_latent.mtp", array(present))])
        self.inference_time = time.perf_counter() - start
        return result


def tensorrt_available() -> tuple[bool, str]:
    try:
        trt_engine.require_tensorrt()
    except ExportError as e:
        return False, str(e).replace("--backend trt needs", "needs")
    return True, ""


def _trt_runner(build_dir: Path, graph: str, feeds: list[dict], name: str):
    """TensorRT through Polygraphy's TrtRunner (engines.trt.polygraphy_runner): the build's saved plan
    when it has one, else an engine built here from the ONNX; each feed runs in the optimization
    profile its shapes fit (prefill or decode)."""
    return trt_engine.polygraphy_runner(build_dir, graph, name=name, feeds=feeds)


def _ort_engine_loader(build_dir: Path, graph: str, providers: list[str]):
    """The ONNX Runtime engine as `engines.ort.session` loads it (its options, optimized at load)."""
    return lambda: ort_engine.session(build_dir, graph[: -len(".onnx")], providers=providers)


def _staged_runner(build_dir: Path, stages: list[dict], backend: str, providers: list[str], name: str):
    """A staged build's main model as one runner: the stages' sessions chained (engines.stages)."""
    def open_one(file: str):
        if backend == "ort":
            return ort_engine.session(build_dir, Path(file).stem, providers=providers)
        if backend == "graph":
            return SessionFromOnnx(str(build_dir / file), providers=providers)()
        return trt_engine.session(build_dir, Path(file).stem)

    return OnnxrtRunner(lambda: StagedSession([open_one(s["file"]) for s in stages], [s["layers"] for s in stages]),
                        name=name)


def runners_for(build_dir: Path, graph: str, backends: list[str], providers: list[str], feeds: list[dict]):
    runners = []
    stages = find_stages(build_dir) if graph == MAIN_GRAPH else []
    if len(stages) > 1:  # a `--stages N` build: every runner chains the stages
        return [(b, _staged_runner(build_dir, stages, b, providers, f"{b}:{graph}")) for b in backends]
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


def runner_greedy(runner, prompt, max_new_tokens: int, empty_past: dict,
                  advance: Callable[[int], None] = lambda n=1: None):
    """Greedy continuation through any Polygraphy runner of model.onnx, driven with its own cache
    (`empty_past`: the first call's cache inputs, with room for prompt + max_new_tokens rows)."""
    tokens = []
    feed = {"input_ids": prompt.astype(np.int64), **empty_past}
    with runner:
        for _ in range(max_new_tokens):
            out = runner.infer(feed)
            nxt = np.asarray(out["logits"])[:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(nxt)
            feed = next_feed(feed, out, nxt)
            advance(1)
    return np.concatenate(tokens, axis=1)
