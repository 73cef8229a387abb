"""CacheWrite: the new latent rows of a step written into the cache buffer, each batch row at its own
length (graph contract v2, docs/design.md "Graph contract").

    past [B,T,C], new [B,S,C], cache_lengths [B] int64  ->  present [B,T,C]
    present[b, L_b + s] = new[b, s] for s < S; every other row of present is past's.

It exports as the standard ONNX `TensorScatter` (opset 24, mode "linear", axis 1), which ONNX
Runtime runs in place when past and present are bound to the same buffer: a step then writes S rows
per sequence instead of copying the whole cache. Not a dsv3 custom op: any ONNX runtime has it.
"""

import torch
from onnxscript.values import Opset

OPSET = 24  # TensorScatter's first opset
_onnx = Opset("", OPSET)


def cache_write(past: torch.Tensor, new: torch.Tensor, cache_lengths: torch.Tensor) -> torch.Tensor:
    """The plain-torch math (a copy of past with the new rows in place)."""
    b, s = new.shape[:2]
    if past.shape[0] != b or past.shape[2:] != new.shape[2:] or tuple(cache_lengths.shape) != (b,):
        raise ValueError(f"CacheWrite: past {tuple(past.shape)}, new {tuple(new.shape)} and cache_lengths "
                         f"{tuple(cache_lengths.shape)} do not fit together ([B,T,C], [B,S,C], [B])")
    rows = cache_lengths.to(torch.int64)[:, None] + torch.arange(s, device=new.device)[None, :]  # [B,S]
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= past.shape[1]):
        raise ValueError(f"CacheWrite: rows {int(rows.min())}..{int(rows.max())} fall outside the buffer's "
                         f"{past.shape[1]} positions")
    index = rows.view(b, s, *([1] * (new.dim() - 2))).expand_as(new)
    return past.scatter(1, index, new.to(past.dtype))


@torch.library.custom_op("dsv3::cache_write", mutates_args=())
def cache_write_op(past: torch.Tensor, new: torch.Tensor, cache_lengths: torch.Tensor) -> torch.Tensor:
    """The op as torch sees it: the model calls this, so torch.export keeps it as one node."""
    return cache_write(past, new, cache_lengths)


@cache_write_op.register_fake
def _(past, new, cache_lengths):
    return torch.empty_like(past)


def torch_translation(past, new, cache_lengths):
    """torch.onnx translation of torch.ops.dsv3.cache_write: one TensorScatter node."""
    return _onnx.TensorScatter(past, new, cache_lengths, axis=1, mode="linear")
