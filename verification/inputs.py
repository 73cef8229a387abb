"""Verification's inputs: a prefill and a chain of decode steps, each fed the reference's own present
latents and argmax token, so that every runner sees identical feeds; the MTP chain over the same
positions."""

from __future__ import annotations

from typing import Callable

import numpy as np

from verification.runners import ReferenceRunner, empty_past, present_to_past


def make_inputs(reference: ReferenceRunner, io: dict, *, prompt, decode_steps: int,
                mtp_reference: ReferenceRunner | None = None, mtp_io: dict | None = None,
                advance: Callable[[int], None] = lambda n=1: None):
    """The data loaders (lists of feed dicts): model.onnx prefill + `decode_steps` decode steps, each
    fed the reference's present latents and argmax token; and, given an MTP reference, the MTP chain
    over the same positions (input_ids = tokens i+1, hidden_states = the reference's h_i)."""
    batch = prompt.shape[0]
    feeds, mtp_feeds = [], []
    feed = {"input_ids": prompt.astype(np.int64), **empty_past(io, batch)}
    mtp_past = empty_past(mtp_io, batch) if mtp_reference is not None else None
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
    return {present_to_past(k): _copy(v) for k, v in out.items() if k.startswith("present_latent")}


def _copy(a):
    return np.array(a, copy=True)


def step_labels(feeds) -> list[dict]:
    labels = []
    for i, f in enumerate(feeds):
        past = next((v.shape[1] for k, v in f.items() if k.startswith("past_latent")), 0)
        labels.append({"step": i, "phase": "prefill" if i == 0 else "decode",
                       "seq": int(f["input_ids"].shape[1]), "past": int(past)})
    return labels
