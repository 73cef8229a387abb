"""Language-model figures of an engine against a reference, on real text.

What matters for a quantized language model is whether it predicts the same next tokens with the
same confidence, not whether every activation is within 1e-4: so top-1 agreement, the KL divergence
of the next-token distributions KL(reference || engine), and the cosine of the logit vectors, per
position, over text that is on every machine (the Python standard library's sources, as in
exporter.checkpoint_writer) tokenized with the build's own tokenizer.json.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from dsv3_export.core.build_dir import MAIN_GRAPH, TOKENIZER
from dsv3_export.core.errors import ExportError
from dsv3_export.exporter.precision_policy import Policy
from dsv3_export.exporter.quant_numerics import emulate
from dsv3_export.exporter.source import load_reference
from dsv3_export.exporter.tokenizer_training import corpus_files

BATCH, SEQ = 2, 128  # 256 positions, each a next-token prediction


def real_text_ids(tokenizer_json: str | Path | None, vocab_size: int, *, batch: int = BATCH, seq: int = SEQ,
                  offset: int = 0) -> np.ndarray:
    """[batch, seq] token ids of stdlib source text. Without a tokenizer (a checkpoint that ships
    none) the UTF-8 bytes of the same text stand in, folded into the vocabulary."""
    need = batch * seq
    ids: list[int] = []
    tok = None
    if tokenizer_json is not None and Path(tokenizer_json).is_file():
        tok = Tokenizer.from_file(str(tokenizer_json))
    for f in corpus_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        ids += tok.encode(text).ids if tok is not None else list(text.encode())
        if len(ids) >= offset + need:
            break
    ids = ids[offset: offset + need]
    if len(ids) < need:
        raise ExportError(f"only {len(ids)} tokens of text found for the language-model check, need {need}")
    arr = np.asarray(ids, dtype=np.int64) % vocab_size
    return arr.reshape(batch, seq)


def lm_metrics(ref_logits: np.ndarray, logits: np.ndarray) -> dict:
    """Per-position figures over [..., V] logits, float64: top-1 agreement (fraction), KL(ref||engine)
    of the softmax distributions in nats (mean, max), logits cosine (mean, min)."""
    r = np.asarray(ref_logits, np.float64).reshape(-1, ref_logits.shape[-1])
    e = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    if r.shape != e.shape:
        raise ExportError(f"logits shapes differ: reference {r.shape}, engine {e.shape}")
    finite = np.isfinite(e).all(axis=-1)
    e = np.where(np.isfinite(e), e, 0.0)
    log_p = r - r.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = e - e.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    kl[~finite] = np.inf
    cos = (r * e).sum(-1) / np.maximum(np.linalg.norm(r, axis=-1) * np.linalg.norm(e, axis=-1), 1e-30)
    cos[~finite] = -1.0
    top1 = r.argmax(-1) == e.argmax(-1)
    return {"positions": int(r.shape[0]), "top1_agreement": float(top1.mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.float().numpy()


def runner_logits(runner, ids: np.ndarray, empty_past: dict) -> np.ndarray:
    """One prefill of `ids` through a Polygraphy runner of model.onnx."""
    with runner:
        out = runner.infer({"input_ids": ids, **empty_past})
    return np.asarray(out["logits"], dtype=np.float32)


def lm_checks(build_dir: Path, source, model, precision: str, backends, make_runner, empty_past: dict,
              tolerance, quantization: dict | None = None, advance=lambda n=1: None) -> list[dict]:
    """The "lm" checks of verify: per backend, top-1 / KL / cosine against `model` (the fp32
    reference) and, where the precision has "lm_cosine_emulated", the cosine against the reference
    emulating the quantized graph (exporter.quant_numerics.emulate). `make_runner(backend)` gives a
    Polygraphy runner of model.onnx; `tolerance(key)` the precision's Tolerance."""
    ids = real_text_ids(Path(build_dir) / TOKENIZER, model.cfg.vocab_size)
    past = {k: np.repeat(v[:1], ids.shape[0], 0) for k, v in empty_past.items()}
    ref = reference_logits(model, ids)
    emulated_ref = None
    try:
        tolerance("lm_cosine_emulated")
        has_emulated = True
    except ExportError:
        has_emulated = False
    if has_emulated:
        emulated_ref = reference_logits(emulated_model(source, model, precision, quantization), ids)
    advance(1)
    checks = []
    for backend in backends:
        try:
            logits = runner_logits(make_runner(backend), ids, past)
        except Exception as e:  # a runner that cannot run fails its checks, with the reason
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            checks.append({"name": f"lm text [{backend}]", "kind": "error", "graph": MAIN_GRAPH,
                           "runner": backend, "passed": False, "error": f"{type(e).__name__}: {text}"})
            continue
        figures = lm_metrics(ref, logits)
        rows = [("lm_cosine", "logits cosine (mean over positions)", figures["cosine_mean"], figures),
                ("lm_top1", "top-1 agreement", figures["top1_agreement"], figures),
                ("lm_kl", "KL(ref || engine) mean, nats", figures["kl_mean"], figures)]
        if emulated_ref is not None:
            emu = lm_metrics(emulated_ref, logits)
            rows.append(("lm_cosine_emulated", "logits cosine vs emulated reference", emu["cosine_mean"], emu))
        for key, what, value, figs in rows:
            tol = tolerance(key)
            ok = value <= tol.limit if tol.metric == "lm_kl" else value >= tol.limit
            checks.append({"name": f"lm {what} [{backend}]", "kind": "lm", "graph": MAIN_GRAPH, "runner": backend,
                           "metric": tol.metric, "key": key, "tolerance": tol.limit, "value": value,
                           "passed": bool(ok and np.isfinite(value)), "figures": figs,
                           "text": {"batch": int(ids.shape[0]), "seq": int(ids.shape[1]),
                                    "source": "Python stdlib sources, build tokenizer"}})
        advance(1)
    return checks


def emulated_model(source, model, precision: str, quantization: dict | None):
    """A fresh reference (model's dtype, MLA form, MTP) turned into the quantized graph's twin."""
    if not quantization or not quantization.get("tensors"):
        raise ExportError(f"precision {precision}: the build records no quantized tensors (manifest "
                          "'quantization'), so its emulated reference cannot be made")
    policy = Policy.make(precision, quantization.get("keep_fp") or ["none"])
    twin = load_reference(source, dtype=model.dtype, mla=model.mla, mtp=False)
    return emulate(twin, source, policy, decisions=quantization["tensors"])
