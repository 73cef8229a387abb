"""A staged build's main model as one session (docs/design.md, "Pipeline stages").

`dsv3-export build --stages N` cuts the decoder into N graphs by layer ranges (exporter/stage_plan.py);
stage k hands its hidden states to stage k+1 and owns its layers' caches. `StagedSession` chains the
stages' sessions (ONNX Runtime or TensorRT, one per stage, each where its stage is placed) behind
the one-graph interface the rest of the engine uses: `get_inputs` / `get_outputs` / `run` (what
Polygraphy's runners call), and `run_in_place` over the cache buffers. A one-graph build is a chain
of one, and any session with onnxruntime's `run` can be a stage (TensorRT's, or a Triton model's). The chain is exact: a stage's
output is the next one's input, bit for bit, so a staged engine computes what the one-graph engine
computes, up to the kernels' own choices for the shapes they see.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import dsv3_export.engines.ort as ort_engine
from dsv3_export.core.errors import ExportError


class StagedSession:
    """Stage sessions in call order; `layers[k]`: (first, end) of the layers stage k owns."""

    def __init__(self, sessions: Sequence, layers: Sequence[Sequence[int]]):
        self.sessions, self.layers = list(sessions), [range(int(a), int(b)) for a, b in layers]
        first, last = self.sessions[0], self.sessions[-1]
        pasts = [i for s in self.sessions for i in s.get_inputs() if i.name.startswith("past_latent.")]
        presents = [o for s in self.sessions for o in s.get_outputs() if o.name.startswith("present_latent.")]
        self._inputs = [i for i in first.get_inputs() if not i.name.startswith("past_latent.")] + pasts
        self._outputs = [o for o in last.get_outputs() if not o.name.startswith("present_latent.")] + presents
        self._stage_outputs = [[o.name for o in s.get_outputs()] for s in self.sessions]

    def get_inputs(self):
        return list(self._inputs)

    def get_outputs(self):
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return self.sessions[0].get_providers() if hasattr(self.sessions[0], "get_providers") else []

    def run(self, output_names, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every stage in turn on `feeds` (the chained contract's inputs); the outputs by name (None: all)."""
        results: dict[str, np.ndarray] = {}
        hidden = None
        for k, (sess, layers) in enumerate(zip(self.sessions, self.layers)):
            own = {"cache_lengths": feeds["cache_lengths"], **{f"past_latent.{i}": feeds[f"past_latent.{i}"] for i in layers}}
            own["input_ids" if k == 0 else "hidden_in"] = feeds["input_ids"] if k == 0 else hidden
            out = dict(zip(self._stage_outputs[k], sess.run(None, own)))
            hidden = out.get("hidden_out")
            results.update(out)
        names = output_names or [o.name for o in self._outputs]
        return [results[n] for n in names]

    def run_in_place(self, ids: np.ndarray, cache_lengths: np.ndarray,
                     buffers: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """engines.ort.run_in_place through the chain: each stage writes its own layers' buffers.
        ids [B, S] and cache_lengths [B] int64; returns (logits, hidden_states)."""
        if ids.shape[1] + int(cache_lengths.max(initial=0)) > buffers[0].shape[1]:
            raise ExportError(f"cache buffers hold {buffers[0].shape[1]} positions; rows up to "
                              f"{int(cache_lengths.max()) + ids.shape[1]} were asked for")
        hidden = None
        for k, (sess, layers) in enumerate(zip(self.sessions, self.layers)):
            inputs = {"input_ids": ids} if k == 0 else {"hidden_in": hidden}
            inputs["cache_lengths"] = cache_lengths
            own = {f"past_latent.{i}": buffers[i] for i in layers}
            last = k == len(self.sessions) - 1
            out = ort_engine.run_in_place(sess, inputs, own, ["logits", "hidden_states"] if last else ["hidden_out"])
            if last:
                return out[0], out[1]
            hidden = out[0]
        raise AssertionError("unreachable: a staged session has at least one stage")
