"""The latent cache of a batch: one buffer per layer, allocated for the batch's longest request and
written in place by each step (graph contract v2, docs/design.md "Graph contract").

Layout per layer: [slots, capacity, C]. Rows 0..n-1 hold the running sequences, in order, so that
a step over all of them binds the contiguous views buffer[:n] as both past and present of the
graph: ONNX Runtime's TensorScatter then writes the step's new rows where they belong and nothing
else moves. A sequence that leaves is replaced by the last one (one copy of that sequence's rows);
a request that needs more positions than the capacity grows it (one copy of every row, rare: the
capacity is set for the longest request admitted, prompt plus max_tokens).
"""

from __future__ import annotations

import numpy as np

CAPACITY_STEP = 64  # capacities are multiples of this: fewer regrowths, at most 63 masked rows read


def zero_cache(layers: int, batch: int, positions: int, row_shape: tuple[int, ...], dtype) -> list[np.ndarray]:
    """Zeroed per-layer cache buffers [batch, positions, *row]: the one place caches are allocated
    (a prefill's buffers, an empty past, the batch's slots)."""
    return [np.zeros((batch, positions, *row_shape), dtype) for _ in range(layers)]


def round_capacity(positions: int) -> int:
    return -(-max(positions, 1) // CAPACITY_STEP) * CAPACITY_STEP


class BatchCache:
    """Per-layer buffers [slots, capacity, *row] and each slot's length (valid rows)."""

    def __init__(self, layers: int, row_shape: tuple[int, ...], dtype, slots: int, capacity: int):
        self.layers, self.row_shape, self.dtype = layers, tuple(row_shape), np.dtype(dtype)
        self.slots, self.capacity = slots, 0
        self.buffers: list[np.ndarray] = []
        self.lengths = np.zeros(slots, np.int64)
        self.ensure(capacity)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def ensure(self, positions: int) -> None:
        """Room for `positions` rows per slot; a larger buffer keeps every slot's valid rows."""
        want = round_capacity(positions)
        if want <= self.capacity:
            return
        keep = int(self.lengths.max()) if self.buffers else 0
        new = zero_cache(self.layers, self.slots, want, self.row_shape, self.dtype)
        for old, fresh in zip(self.buffers, new):
            fresh[:, :keep] = old[:, :keep]
        self.buffers, self.capacity = new, want

    def views(self, start: int, stop: int) -> list[np.ndarray]:
        """The layers' buffers for slots start..stop-1: contiguous, shared with the cache."""
        return [b[start:stop] for b in self.buffers]

    def load(self, slot: int, rows: list[np.ndarray], length: int) -> None:
        """Put one sequence's first `length` rows (per layer, [1, >=length, *row]) into `slot`."""
        self.ensure(length)
        for buf, r in zip(self.buffers, rows):
            buf[slot, :length] = r[0, :length]
        self.lengths[slot] = length

    def move(self, src: int, dst: int) -> None:
        """Slot src's sequence into slot dst (dst's is gone)."""
        n = int(self.lengths[src])
        for buf in self.buffers:
            buf[dst, :n] = buf[src, :n]
        self.lengths[dst], self.lengths[src] = n, 0
