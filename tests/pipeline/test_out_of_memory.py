"""An allocation failure while the weights are written is one ExportError naming the step, the
tensor and the bytes (the CLI prints it as one line)."""

import numpy as np
import pytest

from dsv3_export.core.config import preset
from dsv3_export.core.errors import ExportError
from dsv3_export.core.progress import Reporter
from dsv3_export.exporter.weights import RandomWeights
from dsv3_export.pipeline.build import export_graph


class HungryWeights(RandomWeights):
    """The tiny preset, but reading one expert allocates 256 TiB (a real allocation failure)."""

    def get(self, name):
        if name == "layers.1.ffn.experts.3.w2.weight":
            np.empty(1 << 46, np.float32)
        return super().get(name)


def test_out_of_memory_names_the_step_the_tensor_and_the_bytes(tmp_path):
    with pytest.raises(ExportError) as info:
        export_graph("model", HungryWeights(preset("tiny")), tmp_path, Reporter())
    message = str(info.value)
    assert message.startswith("writing model.onnx weights: out of memory at tensor ")
    assert "ffn.w_down" in message and "Unable to allocate 256. TiB" in message
    assert "\n" not in message
