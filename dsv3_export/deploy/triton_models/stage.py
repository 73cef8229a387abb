"""A pipeline stage of a CPU repository: ONNX Runtime over one stage graph of the build.

Copied into `<repo>/dsv3_stage<k>/1/model.py` by deploy.triton_repo; the config's parameters say
which build (`build_dir`), which graph (`graph`, e.g. stage0.onnx) and how many intra-op threads
(`threads`, 0 = ONNX Runtime's default). engines.ort.session opens the graph and optimizes it as
it loads. Stateless: the caches come in with each request
(past_latent.{i}) and go back out (present_latent.{i}); the `dsv3` model owns them.
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from dsv3_export.core.build_dir import read_manifest
from dsv3_export.core.errors import ExportError
from dsv3_export.engines.ort import CPU, session
from dsv3_export.engines.runtime import check_token_ids


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("threads", "0")) or None
        self.session = session(Path(params["build_dir"]), Path(params["graph"]).stem, providers=[CPU],
                               threads=threads)
        self.inputs = [i["name"] for i in config["input"]]
        # ONNX Runtime's Gather wraps a negative id round to the table's end: check ids here.
        self.vocab = int(read_manifest(Path(params["build_dir"])).config["vocab_size"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                if "input_ids" in feeds:
                    check_token_ids(feeds["input_ids"], self.vocab)
                if "cache_lengths" in feeds and feeds["cache_lengths"].size and feeds["cache_lengths"].min() < 0:
                    raise ExportError(f"cache_lengths must be >= 0, got {int(feeds['cache_lengths'].min())}")
                wanted = list(request.requested_output_names()) or self.outputs
                values = self.session.run(wanted, feeds)
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, value) for name, value in zip(wanted, values)]))
            except ExportError as e:  # a bad input: the client's error (HTTP 400)
                error = pb_utils.TritonError(_first_line(e), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            except Exception as e:  # this request fails; the model keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(_first_line(e))))
        return responses
