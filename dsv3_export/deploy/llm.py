"""The `dsv3` Triton model's logic, without Triton: request fields, stop strings, the stage chain the
scheduler steps, and the per-request responder (deploy/triton_models/dsv3.py is the glue to
triton_python_backend_utils; docs/triton.md).

Fields follow Triton's LLM convention (what its `generate` / `generate_stream` endpoints and the
TensorRT-LLM backend's clients send): `text_input`; optional `max_tokens` (default 64),
`temperature` (0 = greedy, the default) and every other sampling field of
engines.sampling.SamplingParams by its name (`top_p`, `top_k`, `min_p`, `seed`, ...), `stop` (a list
of strings) and `stream` (default false) -> `text_output`.

Stop strings are matched on the decoded text (not mapped to token ids: a string rarely is one
token of a byte-level BPE, and the same text can come out as different tokens): the output ends
just before the first stop string, which is not part of it, and the sequence leaves the batch at
the next step. While a stream's text could still be the start of a stop string it is held back, so
a streamed response can carry empty text; the text of all responses joined is the whole output.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from dsv3_export.core.build_dir import TOKENIZER
from dsv3_export.core.config import ModelConfig
from dsv3_export.core.errors import ExportError
from dsv3_export.engines.kv_cache import zero_cache
from dsv3_export.engines.runtime import check_token_ids
from dsv3_export.engines.sampling import SamplingError, SamplingParams
from dsv3_export.engines.scheduler import QueueFull, Scheduler
from dsv3_export.engines.stages import StagedSession
from dsv3_export.engines.text import TextOutput, tokenize

PIPELINE_FILE = "pipeline.json"  # what the dsv3 model needs of the build, next to its model.py
PIPELINE_FORMAT = 1
DEFAULT_MAX_TOKENS = 64


def _wire_type(f) -> str:
    """A sampling field's Triton type: FP32 for numbers, INT32 for integers unless their range
    needs 64 bits (seed)."""
    if f.type not in ("int", int):
        return "TYPE_FP32"
    return "TYPE_INT64" if f.metadata.get("high", 0) > 2**31 - 1 else "TYPE_INT32"


# The dsv3 model's inputs (name, Triton type, dims, optional): the prompt, every sampling field of
# engines.sampling.SamplingParams by its own name, stop strings, streaming.
INPUTS = (("text_input", "TYPE_STRING", [1], False),
          *((f.name, _wire_type(f), [1], True) for f in SamplingParams.wire_fields()),
          ("stop", "TYPE_STRING", [-1], True), ("stream", "TYPE_BOOL", [1], True))
INPUT_NAMES = tuple(name for name, *_ in INPUTS)

# (model name, {input name: array}, output names) -> {output name: array}: one inference of a stage.
StageCall = Callable[[str, Mapping[str, np.ndarray], Sequence[str]], Mapping[str, np.ndarray]]


class RequestError(ExportError):
    """A request the model refuses (a bad field value, a prompt over the context); the message names
    the field. The model answers it with an error response and keeps serving."""


# ---- request fields -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    params: SamplingParams
    stops: tuple[str, ...]
    stream: bool


def _scalar(inputs: Mapping[str, np.ndarray], name: str, default):
    if name not in inputs or inputs[name] is None:
        return default
    value = np.asarray(inputs[name])
    if value.size != 1:
        raise RequestError(f"{name} must be one value, got {value.size}")
    return value.reshape(-1)[0]


def _text(value, name: str) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{name} is not valid UTF-8 text") from None
    if isinstance(value, str):
        return value
    raise RequestError(f"{name} must be text, got {type(value).__name__}")


def parse_request(inputs: Mapping[str, np.ndarray], eos: int | None) -> GenerateRequest:
    """The request's fields, checked; RequestError naming the first bad one (the sampling fields'
    wording is engines.sampling's, as on every surface). `eos` ends every sequence (the build's EOS
    token, as Engine.generate does). Triton's defaults: greedy, 64 new tokens."""
    if inputs.get("text_input") is None:
        raise RequestError("text_input is required")
    prompt = _text(_scalar(inputs, "text_input", None), "text_input")
    if not prompt:
        raise RequestError("text_input is empty")
    values = {f.name: _scalar(inputs, f.name, None) for f in SamplingParams.wire_fields()}
    values["max_tokens"] = DEFAULT_MAX_TOKENS if values["max_tokens"] is None else values["max_tokens"]
    try:
        params = SamplingParams.from_wire(values, stop=frozenset(() if eos is None else (int(eos),)))
    except SamplingError as e:
        raise RequestError(str(e)) from None
    stream = _scalar(inputs, "stream", False)
    if not isinstance(stream, (bool, np.bool_)):
        raise RequestError(f"stream must be a boolean, got {stream!r}")
    stop = inputs.get("stop")
    stops = () if stop is None else tuple(s for s in (_text(v, "stop") for v in np.asarray(stop).reshape(-1)) if s)
    return GenerateRequest(prompt, params, stops, bool(stream))


# ---- the stage chain ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Name:
    name: str


class StageModel:
    """One stage model behind onnxruntime's session interface (`get_inputs`, `get_outputs`,
    `run`), one Triton inference per run through `call`, so engines.stages.StagedSession chains the
    stage models as it chains ONNX Runtime sessions."""

    def __init__(self, model: str, layers: Sequence[int], first_input: str, outputs: Sequence[str], call: StageCall):
        self.model, self.call = model, call
        first, end = layers
        self._inputs = [_Name(n) for n in (first_input, "cache_lengths", *(f"past_latent.{i}" for i in range(first, end)))]
        self._outputs = [_Name(n) for n in outputs]

    def get_inputs(self) -> list[_Name]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Name]:
        return list(self._outputs)

    def run(self, output_names, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        names = list(output_names or [o.name for o in self._outputs])
        out = self.call(self.model, feeds, names)
        return [out[n] for n in names]


class StageChain:
    """What engines.scheduler.Scheduler needs of an engine, over the stage models: `step_in_place`
    calls each stage in order (StagedSession over StageModel: one inference each), passing the
    hidden states on and that stage's cache buffers, and writes the presents it returns back into
    the buffers."""

    buffered = True

    def __init__(self, pipeline: Mapping[str, Any], call: StageCall, build_dir: str = "build"):
        self.config = ModelConfig.from_dict(pipeline["config"], origin=PIPELINE_FILE)
        self.build_dir = Path(pipeline.get("build", build_dir))
        self.n_layers = self.config.n_layers
        self.cache_shape = tuple(int(d) for d in pipeline["cache"]["shape"])
        self.cache_dtype = np.dtype(pipeline["cache"]["dtype"])
        stages = pipeline["stages"]
        self._chain = StagedSession([StageModel(s["model"], s["layers"], s["first_input"], s["outputs"], call)
                                     for s in stages], [s["layers"] for s in stages])

    def check_ids(self, ids: np.ndarray) -> None:
        check_token_ids(ids, self.config.vocab_size)

    def empty_buffers(self, batch: int, positions: int) -> list[np.ndarray]:
        return zero_cache(self.n_layers, batch, positions, self.cache_shape, self.cache_dtype)

    def step_in_place(self, ids: np.ndarray, cache_lengths: np.ndarray,
                      buffers: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self._chain.run_in_place(np.ascontiguousarray(ids, np.int64),
                                        np.ascontiguousarray(cache_lengths, np.int64), buffers)


# ---- the model ------------------------------------------------------------------------------------
class Sink:
    """Where one request's responses go (the Triton response sender, in deploy/triton_models/dsv3.py)."""

    def send(self, text: str, final: bool = False) -> None:
        raise NotImplementedError

    def error(self, message: str) -> None:
        """An error response; it is the request's last."""
        raise NotImplementedError

    def final(self) -> None:
        """The final flag, without a response."""
        raise NotImplementedError

    def cancelled(self) -> bool:
        return False


class Generator:
    """Tokenizer + scheduler over a StageChain: `submit(fields, sink)` answers one request through
    its sink, from a thread of its own that follows the request's tokens."""

    def __init__(self, folder: Path, call: StageCall, *, max_batch: int = 8, max_waiting: int = 256,
                 prefill_chunk: int = 256):
        pipeline = json.loads((folder / PIPELINE_FILE).read_text())
        if pipeline.get("format") != PIPELINE_FORMAT:
            raise ExportError(f"{folder / PIPELINE_FILE}: format {pipeline.get('format')!r}, expected {PIPELINE_FORMAT}")
        self.chain = StageChain(pipeline, call)
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER))
        cfg = self.chain.config
        self.eos, self.bos = cfg.eos_token_id, cfg.bos_token_id
        self.scheduler = Scheduler(self.chain, max_batch=max_batch, max_waiting=max_waiting,
                                   prefill_chunk=prefill_chunk)
        self._live: set = set()  # requests submitted and not yet answered in full
        self._lock = threading.Lock()

    def start(self) -> None:
        self.scheduler.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what still waits or runs (each responder then sends its final flag) and stop the
        scheduler's thread."""
        with self._lock:
            pending = list(self._live)
        for req in pending:
            req.cancel()
        deadline = time.monotonic() + timeout
        for req in pending:
            req.wait(max(0.0, deadline - time.monotonic()))
        self.scheduler.stop(max(0.1, deadline - time.monotonic()))

    def tokenize(self, text: str) -> list[int]:
        """As engines.runtime.Engine.tokenize(text): the tokenizer's ids, BOS first."""
        return tokenize(self.tokenizer, text, self.bos)

    def submit(self, inputs: Mapping[str, np.ndarray], sink: Sink) -> threading.Thread:
        """Start one request; RequestError (nothing sent) when it cannot run."""
        request = parse_request(inputs, self.eos)
        ids = self.tokenize(request.prompt)
        try:
            req = self.scheduler.submit(ids, request.params)
        except QueueFull as e:
            raise RequestError(f"server busy: {e}") from None
        except ExportError as e:  # the prompt: too long for the context, an id out of range
            raise RequestError(f"text_input: {e}") from None
        with self._lock:
            self._live.add(req)
        thread = threading.Thread(target=self._respond, args=(req, request, sink), daemon=True,
                                  name=f"dsv3-request-{req.id}")
        thread.start()
        return thread

    def _respond(self, req, request: GenerateRequest, sink: Sink) -> None:
        """Follow the request's tokens: one response per token when streaming (its new text; empty
        while a character or a possible stop string is incomplete), else one response at the end."""
        out = TextOutput(self.tokenizer, stop_strings=request.stops, stop_ids=request.params.stop)
        try:
            for token in req:  # ends when the scheduler finishes the request, whatever the reason
                if out.stopped:
                    continue
                piece = out.push(token)
                if out.stops.stopped:
                    req.cancel()
                if request.stream and not out.stop_token:  # a stop token is not part of the text
                    sink.send(piece)
                if sink.cancelled():  # the client went away: free its slot
                    req.cancel()
            if req.finish_reason == "error":
                sink.error(req.error or "generation failed")
                return
            tail = out.finish()
            if request.stream:
                if tail:
                    sink.send(tail)
                sink.final()
            else:
                sink.send(out.text, final=True)
        except Exception as e:  # the client must get its final response, whatever went wrong here
            req.cancel()
            try:
                sink.error(f"{type(e).__name__}: {e}")
            except Exception:  # the sender itself is broken (the client is gone): nobody to tell
                pass
        finally:
            with self._lock:
                self._live.discard(req)
