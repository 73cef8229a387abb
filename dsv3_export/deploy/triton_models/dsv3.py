"""The `dsv3` model: text in, text out, decoupled (docs/triton.md).

Copied into `<repo>/dsv3/1/model.py` by deploy.triton_repo, next to `pipeline.json` (the build's
config, cache layout and stage models) and `tokenizer.json`. It owns tokenization, the sequences'
latent caches and continuous batching (engines.scheduler.Scheduler over deploy.llm.StageChain,
which runs each stage model through one BLS request per step), sampling and streaming. Requests
are answered from the scheduler's side, one thread per request, so `execute` returns at once and
new requests join the running batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from dsv3_export.core.errors import ExportError
from dsv3_export.deploy.llm import INPUT_NAMES, Generator, RequestError, Sink

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _bls(model: str, inputs, outputs):
    """One inference of a stage model, in this process's Triton (BLS)."""
    request = pb_utils.InferenceRequest(model_name=model, requested_output_names=list(outputs),
                                        inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()])
    response = request.exec()
    if response.has_error():
        raise ExportError(f"{model}: {response.error().message()}")
    # Copies: the arrays must outlive the response's shared memory.
    return {name: np.array(pb_utils.get_output_tensor_by_name(response, name).as_numpy()) for name in outputs}


class TritonSink(Sink):
    """One request's response sender."""

    def __init__(self, sender):
        self.sender = sender

    def _response(self, text: str):
        return pb_utils.InferenceResponse([pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))])

    def send(self, text: str, final: bool = False) -> None:
        self.sender.send(self._response(text), flags=FINAL if final else 0)

    def error(self, message: str) -> None:
        self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)

    def final(self) -> None:
        self.sender.send(flags=FINAL)

    def cancelled(self) -> bool:
        check = getattr(self.sender, "is_cancelled", None)  # the client went away (Triton >= 23.10)
        return bool(check and check())


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / str(args["model_version"])
        self.generator = Generator(folder, _bls, max_batch=int(params.get("max_batch", "8")),
                                   max_waiting=int(params.get("max_waiting", "256")),
                                   prefill_chunk=int(params.get("prefill_chunk", "256")))
        self.generator.start()

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request.get_response_sender())
            try:
                inputs = {}
                for name in INPUT_NAMES:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                self.generator.submit(inputs, sink)
            except RequestError as e:
                sink.error(str(e))
            except Exception as e:  # a bug answers this request only; the model keeps serving
                sink.error(f"{type(e).__name__}: {e}")

    def finalize(self):
        self.generator.stop()
