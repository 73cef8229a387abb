"""Inputs both LatentAttention test files use: buffers with ragged per-row lengths."""

import torch


def ragged(latent, s, seed, garbage="random"):
    """Random L_b in [0, T - S] per row (the first 0, the last T - S when B > 1);
    rows t >= L_b + S overwritten with garbage."""
    b, t, _ = latent.shape
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, t - s + 1, (b,), generator=g, dtype=torch.int64)
    if b > 1:
        lengths[0], lengths[-1] = 0, t - s
    latent = latent.clone()
    for i in range(b):
        tail = latent[i, int(lengths[i]) + s:]
        if garbage == "random":
            tail.copy_((torch.randn(tail.shape, generator=g) * 50).to(tail.dtype))
        else:
            tail.fill_(float("nan"))
            tail[::2] = float("inf")
    return latent, lengths.to(latent.device)
