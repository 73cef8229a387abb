"""The memory bound of decode: bytes a single-token step must read, and how fast this machine reads.

A decode step of a large model does a few multiply-adds per weight byte: its speed is set by how fast
the weights stream from memory, not by arithmetic. `step_bytes` counts what the engine's graph must
read for one token — every weight once, one embedding row, the chosen experts' share of each expert
stack, the cache — in the weight formats that graph holds; `read_bandwidth` times ONNX Runtime's own
matrix-vector product over a matrix larger than any cache. Their ratio is the fastest any runtime
could decode with those weights on this machine, which `bench` sets beside what the engine measures.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from dsv3_export.core.build_dir import Manifest, stage_graphs
from dsv3_export.exporter.passes.lower_ort_moe import ROUTED_EXPERT_WEIGHT

# Ops that run only the experts each token is routed to: ours (docs/design.md, "Custom ops") and ONNX Runtime's.
EXPERT_OPS = {"MoEDispatch", "MoEDispatchFP8", "MoE", "QMoE"}
# Ops a weight may pass through on its way to an expert op (quantized forms).
_PASS_THROUGH = {"DequantizeLinear", "Cast"}
# Ops that read a tensor's shape, not its data.
_SHAPE_ONLY = {"Shape", "Size"}


def _graphs(graph: ir.Graph):
    """A graph and every subgraph under it (If branches)."""
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from _graphs(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.as_graphs():
                    yield from _graphs(g)


def _gathers_chosen(gather: ir.Node) -> bool:
    producer = gather.inputs[1].producer() if len(gather.inputs) > 1 and gather.inputs[1] is not None else None
    return producer is not None and producer.op_type == "Unique"


def _kinds(value: ir.Value, depth: int = 0) -> set[str]:
    """How the graph reads a weight: as an embedding table (Gather), as an expert stack (read only
    for the chosen experts), or whole ("other"). Uses inside If branches count (same Value)."""
    kinds = set()
    for user, index in value.uses():
        if user.op_type in _SHAPE_ONLY:
            continue
        if user.op_type in EXPERT_OPS and index > 0:
            kinds.add("experts")
        elif user.op_type == "Gather" and index == 0 and _gathers_chosen(user):
            kinds.add("experts")  # lowered fp8 experts: a stack gathered at Unique(topk_idx)
        elif user.op_type == "Gather" and index == 0 and depth == 0:
            kinds.add("embedding")
        elif user.op_type in _PASS_THROUGH and depth < 2:
            kinds |= _kinds(user.outputs[0], depth + 1)
        else:
            kinds.add("other")
    return kinds


def _expert_share(n: int, cfg: dict) -> float:
    """Share of an expert stack of n entries that one token reads: its top-k routed experts, plus the
    shared ones where the lowering folded them into the stack (n a multiple of routed + shared)."""
    routed, shared, k = cfg["n_routed_experts"], cfg.get("n_shared_experts", 0), cfg["n_activated_experts"]
    if shared and n % (routed + shared) == 0:
        return (k + shared) / (routed + shared)
    if n % routed == 0:
        return k / routed
    return 1.0


def step_bytes(graph_path: str | Path, cfg: dict) -> dict[str, int]:
    """Weight bytes one decode token must read through the graph at `graph_path` (external data is
    not loaded: shapes and types suffice): {"weights", "embedding", "experts", "other"}."""
    model = ir.load(str(graph_path))
    out = {"embedding": 0, "experts": 0, "other": 0}
    for graph in _graphs(model.graph):
        for value in graph.initializers.values():
            tensor, kinds = value.const_value, _kinds(value)
            if tensor is None or not kinds:
                continue
            if ROUTED_EXPERT_WEIGHT.search(value.name):  # one routed expert's own weight (lowered fp32)
                share = cfg["n_activated_experts"] / cfg["n_routed_experts"]
                out["experts"] += round(tensor.nbytes * share)
            elif kinds == {"embedding"} and len(tensor.shape) == 2:
                out["embedding"] += tensor.nbytes // tensor.shape[0]
            elif kinds == {"experts"} and len(tensor.shape) >= 1:
                out["experts"] += round(tensor.nbytes * _expert_share(tensor.shape[0], cfg))
            else:
                out["other"] += tensor.nbytes
    out["weights"] = sum(out.values())
    return out


def main_step_bytes(build_dir: str | Path, manifest: Manifest) -> dict[str, int]:
    """step_bytes of a build's main model: model.onnx, or summed over a staged build's stages."""
    total: dict[str, int] = {}
    for stage in stage_graphs(manifest):
        for k, v in step_bytes(Path(build_dir) / stage["file"], manifest.config).items():
            total[k] = total.get(k, 0) + v
    return total


def read_bandwidth(threads: int, megabytes: int = 256, repeats: int = 15) -> float:
    """Bytes/s ONNX Runtime's float32 matrix-vector product streams through a `megabytes` matrix with
    `threads` intra-op threads (median of `repeats` calls after two warm-ups)."""
    rows = 4096
    cols = megabytes * 2**20 // (4 * rows)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, rows]))
    w = ir.Value(name="w", const_value=ir.tensor(np.full((rows, cols), 0.5, np.float32), name="w"))
    gemv = ir.node("MatMul", [x, w])
    graph = ir.Graph([x], gemv.outputs, nodes=[gemv], initializers=[w], opset_imports={"": 17})
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    with tempfile.TemporaryDirectory(prefix="dsv3-bandwidth-") as tmp:
        path = Path(tmp) / "gemv.onnx"
        ir.save(ir.Model(graph, ir_version=9), path, external_data="gemv.onnx.data")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.ones((1, rows), np.float32)
    for _ in range(2):
        session.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - started)
    times.sort()
    return rows * cols * 4 / times[len(times) // 2]


def decode_bound(weights: dict[str, int], cache_bytes: dict[str, int], bandwidth: float,
                 measured: dict[str, float]) -> dict[str, Any]:
    """Per context: bytes a token reads (weights + that context's cache), the tokens/s those bytes
    allow at `bandwidth`, and the share of it the measured tokens/s reach."""
    out = {}
    for context, cache in cache_bytes.items():
        total = weights["weights"] + cache
        bound = bandwidth / total
        out[context] = {"bytes": total, "tokens_per_s": bound,
                        "reached": measured[context] / bound if context in measured else None}
    return out
