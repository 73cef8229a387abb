"""Trace the absorbed reference to ONNX, without its weights.

The model is built on the `meta` device (shapes, no storage) and traced by torch.onnx's dynamo
exporter; the two custom ops become single `dsv3::LatentAttention` / `dsv3::MoEDispatch` nodes.
Weights come later, one tensor at a time (passes/attach_weights.py), so tracing costs the same for
a 16 MB and a 700 GB checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
from torch import nn

from dsv3_export.core.config import ModelConfig
from dsv3_export.core.errors import ExportError
from dsv3_export.exporter.model import Transformer
from dsv3_export.plugins.cache_write import op as cache_write
from dsv3_export.plugins.latent_attention import onnx_function as la
from dsv3_export.plugins.moe_dispatch import onnx_function as moe

# TensorScatter (the in-place cache write) needs 24; Attention (the ORT lowering) 23, and the
# function bodies are written for 23, which a model of opset 24 still runs.
OPSET = cache_write.OPSET
# Example sizes for tracing: above 1 so torch.export does not specialise them.
_EXAMPLE_BATCH, _EXAMPLE_SEQ, _EXAMPLE_PAST = 2, 3, 4


class MainGraph(nn.Module):
    """The graph contract (docs/design.md): absorbed, input_ids, cache_lengths, past_latent.{i} (cache
    buffers) -> logits, hidden_states, present_latent.{i} (the buffers with the new rows written);
    naive, input_ids, past_latent.{i} (prefixes) -> ..., present_latent.{i} (the prefixes grown)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, *inputs):
        if self.model.mla == "absorbed":
            out = self.model(input_ids, list(inputs[1:]), inputs[0])
        else:
            out = self.model(input_ids, list(inputs))
        return (out.logits, out.hidden_states, *out.past)


class MTPGraph(nn.Module):
    """input_ids (tokens i+1), hidden_states (h_i), [cache_lengths,] past_latent.mtp -> logits,
    present_latent.mtp; cache_lengths as in MainGraph (absorbed only)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, hidden_states, *inputs):
        if self.model.mla == "absorbed":
            return self.model.mtp_forward(input_ids, hidden_states, inputs[1], cache_lengths=inputs[0])
        return self.model.mtp_forward(input_ids, hidden_states, inputs[0])


class StageGraph(nn.Module):
    """Layers first..end-1 of the main graph (docs/design.md, "Pipeline stages"): stage 0 takes
    input_ids, later stages hidden_in (the previous stage's hidden_out); the last stage ends with the
    final norm and head (logits, hidden_states), the others return hidden_out. cache_lengths and the
    stage's own cache buffers as in MainGraph (absorbed only)."""

    def __init__(self, model: Transformer, first: int, end: int):
        super().__init__()
        self.model, self.first, self.end = model, first, end

    def forward(self, x, cache_lengths, *buffers):
        m = self.model
        cos, sin = m._angles(None, x.shape[1], x.device, cache_lengths)
        if self.first == 0:
            x = m.embed(x)
        presents = []
        for i, buffer in zip(range(self.first, self.end), buffers):
            x, cache = m.layers[i](x, cos, sin, buffer, cache_lengths)
            presents.append(cache)
        if self.end < m.cfg.n_layers:
            return (x, *presents)
        hidden = m.norm(x)
        return (m.head(hidden), hidden, *presents)


def meta_model(cfg: ModelConfig, *, mla: str = "absorbed", has_gate_bias: bool = True, mtp: bool = True) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg, dtype=torch.float32, mla=mla, has_gate_bias=has_gate_bias, mtp=mtp)


def cache_width(cfg: ModelConfig, mla: str) -> tuple[int, ...]:
    """Trailing dims of one layer's cache: the latent row, or naive per-head K|V."""
    if mla == "absorbed":
        return (cfg.latent_dim,)
    return (cfg.n_heads, cfg.qk_head_dim + cfg.v_head_dim)


def _translations() -> dict:
    la.register_schema()
    moe.register_schema()
    return {torch.ops.dsv3.latent_attention.default: la.torch_translation,
            torch.ops.dsv3.moe_dispatch.default: moe.torch_translation,
            torch.ops.dsv3.cache_write.default: cache_write.torch_translation}


def _export(module: nn.Module, args: tuple, input_names, output_names, dynamic_shapes):
    """torch.onnx.export (dynamo) → onnx_ir.Model, quietly: its chatter is not our user's business."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, optimize=False, opset_version=OPSET, verbose=False,
            input_names=list(input_names), output_names=list(output_names),
            dynamic_shapes=dynamic_shapes, custom_translation_table=_translations(),
        )
    return program.model


def export_main(model: Transformer):
    """The main graph of a (meta) Transformer as an onnx_ir.Model with weightless initializers."""
    cfg = model.cfg
    batch, seq, past = (torch.export.Dim("batch"), torch.export.Dim("seq"),
                        torch.export.Dim("past", min=0, max=cfg.max_seq_len))
    width = cache_width(cfg, model.mla)
    ids = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_SEQ, dtype=torch.int64, device="meta")
    pasts = tuple(torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_PAST, *width, device="meta") for _ in range(cfg.n_layers))
    inputs = ["input_ids"] + [f"past_latent.{i}" for i in range(cfg.n_layers)]
    outputs = ["logits", "hidden_states"] + [f"present_latent.{i}" for i in range(cfg.n_layers)]
    dynamic = ({0: batch, 1: seq}, tuple({0: batch, 1: past} for _ in pasts))
    if model.mla == "absorbed":  # the cache buffers' lengths follow input_ids
        lengths = torch.zeros(_EXAMPLE_BATCH, dtype=torch.int64, device="meta")
        return _export(MainGraph(model), (ids, lengths, *pasts), inputs[:1] + ["cache_lengths"] + inputs[1:],
                       outputs, ({0: batch, 1: seq}, ({0: batch}, *dynamic[1])))
    return _export(MainGraph(model), (ids, *pasts), inputs, outputs, dynamic)


def stage_io(cfg: ModelConfig, first: int, end: int) -> tuple[list[str], list[str]]:
    """Input and output names of the stage over layers first..end-1 (core.build_dir.stage_graphs)."""
    inputs = ["input_ids" if first == 0 else "hidden_in", "cache_lengths"] + [f"past_latent.{i}" for i in range(first, end)]
    outputs = (["logits", "hidden_states"] if end == cfg.n_layers else ["hidden_out"]) + \
        [f"present_latent.{i}" for i in range(first, end)]
    return inputs, outputs


def export_stage(model: Transformer, first: int, end: int):
    """One pipeline stage of a (meta, absorbed) Transformer as an onnx_ir.Model, weightless."""
    cfg = model.cfg
    if model.mla != "absorbed":
        raise ExportError("--stages needs --mla absorbed (the stages pass cache buffers, graph contract v2)")
    batch, seq, past = (torch.export.Dim("batch"), torch.export.Dim("seq"),
                        torch.export.Dim("past", min=0, max=cfg.max_seq_len))
    if first == 0:
        x = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_SEQ, dtype=torch.int64, device="meta")
    else:
        x = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_SEQ, cfg.dim, device="meta")
    lengths = torch.zeros(_EXAMPLE_BATCH, dtype=torch.int64, device="meta")
    buffers = tuple(torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_PAST, *cache_width(cfg, "absorbed"), device="meta")
                    for _ in range(first, end))
    dynamic = ({0: batch, 1: seq}, {0: batch}, tuple({0: batch, 1: past} for _ in buffers))
    inputs, outputs = stage_io(cfg, first, end)
    return _export(StageGraph(model, first, end), (x, lengths, *buffers), inputs, outputs, dynamic)


def export_mtp(model: Transformer):
    cfg = model.cfg
    batch, seq, past = (torch.export.Dim("batch"), torch.export.Dim("seq"),
                        torch.export.Dim("past", min=0, max=cfg.max_seq_len))
    ids = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_SEQ, dtype=torch.int64, device="meta")
    hidden = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_SEQ, cfg.dim, device="meta")
    cache = torch.zeros(_EXAMPLE_BATCH, _EXAMPLE_PAST, *cache_width(cfg, model.mla), device="meta")
    outputs = ["logits", "present_latent.mtp"]
    if model.mla == "absorbed":
        lengths = torch.zeros(_EXAMPLE_BATCH, dtype=torch.int64, device="meta")
        return _export(MTPGraph(model), (ids, hidden, lengths, cache),
                       ["input_ids", "hidden_states", "cache_lengths", "past_latent.mtp"], outputs,
                       ({0: batch, 1: seq}, {0: batch, 1: seq}, ({0: batch}, {0: batch, 1: past})))
    return _export(MTPGraph(model), (ids, hidden, cache), ["input_ids", "hidden_states", "past_latent.mtp"],
                   outputs, ({0: batch, 1: seq}, {0: batch, 1: seq}, ({0: batch, 1: past},)))
