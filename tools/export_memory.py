"""Peak RSS of the export stage (trace + passes + streamed weight writing) next to model bytes.

    python tools/export_memory.py CHECKPOINT_OR_PRESET [--mtp]

Prints one JSON line: peak RSS, the largest single graph tensor, the bytes of model.onnx.data.
The full `build` also loads the graph into ONNX Runtime and, when verifying, the PyTorch reference:
those hold the whole model by nature; measure them with /usr/bin/time -v dsv3-export build.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--mtp", action="store_true", help="export mtp.onnx too")
    args = ap.parse_args()

    import onnx

    from dsv3_export.exporter import open_source
    from dsv3_export.pipeline.build import Reporter, export_graph

    src = open_source(args.source)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        paths = [export_graph("model", src, Path(tmp), Reporter())]
        if args.mtp and src.has_mtp:
            paths.append(export_graph("mtp", src, Path(tmp), Reporter()))
        largest, data = 0, 0
        for p in paths:
            m = onnx.load(str(p), load_external_data=False)
            for init in m.graph.initializer:
                n = 4
                for d in init.dims:
                    n *= d
                largest = max(largest, n)
            data += Path(str(p) + ".data").stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"source": args.source, "peak_rss_bytes": peak, "largest_tensor_bytes": largest,
                      "onnx_data_bytes": data, "seconds": round(time.time() - started, 1)}))


if __name__ == "__main__":
    main()
