"""Verification's inputs: a prefill and a chain of decode steps, each fed the reference's own present
latents and argmax token, so that every runner sees identical feeds; the MTP chain over the same
positions."""

from __future__ import annotations

from typing import Callable

import numpy as np

from dsv3_export.verification.runners import ReferenceRunner, empty_past, next_feed


def make_inputs(reference: ReferenceRunner, io: dict, *, prompt, decode_steps: int,
                mtp_reference: ReferenceRunner | None = None, mtp_io: dict | None = None,
                advance: Callable[[int], None] = lambda n=1: None):
    """The data loaders (lists of feed dicts): model.onnx prefill + `decode_steps` decode steps, each
    fed the reference's present latents and argmax token; and, given an MTP reference, the MTP chain
    over the same positions (input_ids = tokens i+1, hidden_states = the reference's h_i)."""
    batch, capacity = prompt.shape[0], prompt.shape[1] + decode_steps + 1
    feeds, mtp_feeds = [], []
    feed = {"input_ids": prompt.astype(np.int64), **empty_past(io, batch, capacity)}
    mtp_past = empty_past(mtp_io, batch, capacity) if mtp_reference is not None else None
    with reference:
        for step in range(decode_steps + 1):
            feeds.append(feed)
            out = reference.infer(feed)
            nxt = out["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
            if mtp_reference is not None:
                ids = np.concatenate([feed["input_ids"][:, 1:], nxt], axis=1)
                mtp_feeds.append({"input_ids": ids, "hidden_states": _copy(out["hidden_states"])})
            feed = next_feed(feed, out, nxt)
            advance(1)
    if mtp_reference is not None:
        with mtp_reference:
            for f in mtp_feeds:  # each step's past = the reference's present of the step before
                f.update(mtp_past)
                mtp_past = next_feed(f, mtp_reference.infer(f), None)
                del mtp_past["input_ids"]
                advance(1)
    return feeds, mtp_feeds


def _copy(a):
    return np.array(a, copy=True)


def step_labels(feeds) -> list[dict]:
    labels = []
    for i, f in enumerate(feeds):
        past = int(f["cache_lengths"].max()) if "cache_lengths" in f else \
            next((v.shape[1] for k, v in f.items() if k.startswith("past_latent")), 0)
        labels.append({"step": i, "phase": "prefill" if i == 0 else "decode",
                       "seq": int(f["input_ids"].shape[1]), "past": int(past)})
    return labels
