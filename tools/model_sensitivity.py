"""How far a model's logits move when its input embeddings are nudged, with no quantization at all:
the floor under any precision's cosine / top-1 / KL figures for that model (docs/precision.md).

    python tools/model_sensitivity.py SOURCE [--eps 1e-4,1e-3,1e-2] [--tokens 128] [--threads 2]

SOURCE: a checkpoint directory, "demo" or a preset. Each embedding weight is scaled by
(1 + eps·N(0,1)) (fixed seed) and the fp32 reference's logits over random tokens are compared with
the unperturbed ones by verification.lm_eval.lm_metrics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("source")
    ap.add_argument("--eps", default="1e-4,1e-3,1e-2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from dsv3_export.exporter import load_reference, open_source
    from dsv3_export.verification.lm_eval import lm_metrics

    torch.set_num_threads(args.threads)
    source = open_source(args.source)
    model = load_reference(source, dtype=torch.float32, mtp=False)
    ids = torch.from_numpy(np.random.default_rng(0).integers(2, source.config.vocab_size, (1, args.tokens)))
    with torch.no_grad():
        clean = model(ids).logits[0].numpy()
    embedding = model.embed.weight.data.clone()
    rows = []
    for eps in (float(e) for e in args.eps.split(",")):
        noise = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            model.embed.weight.copy_(embedding * (1 + eps * noise))
            nudged = model(ids).logits[0].numpy()
        figures = {k: v for k, v in lm_metrics(clean, nudged).items() if isinstance(v, float)}
        rows.append({"eps": eps, **figures})
        print(f"eps {eps:g}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))
    return rows


if __name__ == "__main__":
    main()
