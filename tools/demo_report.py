"""The record of a tools/train_demo.py run: the loss curve (loss.png) and the demo's README.md.

A script module beside train_demo.py (tools/ holds scripts, not a package): train_demo loads it by path.
"""

from __future__ import annotations

import json
import platform
import sysconfig
from pathlib import Path

import numpy as np
import torch


def plot(history: list[dict], evals: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    tok = [h["tokens"] / 1e6 for h in history]

    def smooth(v, k=20):
        """Trailing mean over k steps (over the steps so far at the start)."""
        v = np.asarray(v, dtype=float)
        c = np.cumsum(np.insert(v, 0, 0.0))
        n = np.minimum(np.arange(1, len(v) + 1), k)
        return (c[1:] - c[np.arange(1, len(v) + 1) - n]) / n

    ax.plot(tok, smooth([h["loss"] for h in history]), label="train: next token", lw=1.4)
    ax.plot(tok, smooth([h["mtp_loss"] for h in history]), label="train: MTP (token i+2)", lw=1.4)
    if evals:
        et = [e["tokens_seen"] / 1e6 for e in evals]
        ax.plot(et, [e["loss"] for e in evals], "o-", label="held-out: next token", ms=3.5)
        ax.plot(et, [e["mtp_loss"] for e in evals], "s--", label="held-out: MTP", ms=3.5)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


README = """# The embedded demo model

A small DeepSeek-V3-architecture model trained on the Python standard library's sources: the
default SOURCE of `dsv3-export build` (`demo`). Hugging Face layout, bf16 (router fp32), with its
MTP layer (`model.layers.{mtp_layer}.*`, output head shared with the main model) and a byte-level BPE
`tokenizer.json`.

| | |
|---|---|
| shape | {shape} |
| parameters | {params} in the main model + {mtp} in the MTP layer (its head shared), {size} on disk |
| data | {data} |
| training | {training} |
| held-out | perplexity **{ppl:.2f}** (vocab {vocab}), next-token accuracy {acc:.1%}, MTP accuracy on token i+2 {mtp_acc:.1%}, MTP draft = main greedy {agree:.1%} |

![loss](loss.png)

Reproduce (2 CPU cores; the schedule follows the wall-clock budget, so the step count depends on
the machine):

```sh
{command}
```

`metrics.json` holds every figure, the configuration and the training history.
"""


def write_readme(out: Path, metrics: dict) -> None:
    cfg = metrics["config"]
    shape = (f"dim {cfg['dim']}, {cfg['n_layers']} layers ({cfg['n_dense_layers']} dense), {cfg['n_heads']} heads, "
             f"MLA q_lora {cfg['q_lora_rank']} / kv_lora {cfg['kv_lora_rank']} / rope {cfg['qk_rope_head_dim']}, "
             f"{cfg['n_routed_experts']} routed experts top-{cfg['n_activated_experts']} + {cfg['n_shared_experts']} "
             f"shared ({cfg['score_func']}, correction bias), 1 MTP layer, vocab {cfg['vocab_size']}")
    t = metrics["training"]
    training = (f"{t['steps']} steps × {t['batch']} × {t['seq_len']} tokens ({t['tokens'] / 1e6:.2f} M tokens), "
                f"{t['seconds'] / 60:.1f} min on {t['threads']} CPU threads; AdamW lr {t['lr']}, warm-up "
                f"{t['warmup']} steps then cosine; MTP loss weight λ = {t['mtp_weight']}; bias update γ = "
                f"{t['bias_rate']}; final routing imbalance (max/mean load) {t['final_imbalance']:.2f}")
    d = metrics["data"]
    data = (f"{d['train_files']} train / {d['heldout_files']} held-out files of Python {d['python']}'s stdlib "
            f"({d['train_tokens'] / 1e6:.2f} M / {d['heldout_tokens'] / 1e6:.2f} M tokens)")
    h = metrics["heldout"]
    p = metrics["parameters"]
    (out / "README.md").write_text(README.format(
        mtp_layer=cfg["n_layers"], shape=shape, params=f"{p['total'] / 1e6:.2f} M", mtp=f"{p['mtp'] / 1e6:.2f} M",
        size=f"{metrics['bytes'] / 2**20:.1f} MiB", data=data, training=training, ppl=h["perplexity"],
        vocab=cfg["vocab_size"], acc=h["accuracy"], mtp_acc=h["mtp_accuracy"], agree=h["mtp_agreement"],
        command=metrics["command"]))


def metrics(command: str, args, cfg, data: dict, run: dict, check: dict) -> dict:
    """metrics.json's content (less `bytes`, known once the files are written): the command, the
    configuration, the data, the training settings and history, the held-out figures, the reload check."""
    from dsv3_export.exporter.describe import parameter_counts

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    history = run["history"]
    return {
        "command": command.strip(),
        "config": cfg.replace(weight_dtype="bf16").to_dict(),
        "parameters": parameter_counts(cfg),
        "data": {"python": platform.python_version(), "train_files": len(data["train_files"]),
                 "heldout_files": len(data["held_files"]), "train_tokens": int(len(data["train_ids"])),
                 "heldout_tokens": int(len(data["held_ids"])), "heldout_frac": args.heldout_frac,
                 "heldout_file_names": [f.relative_to(stdlib).as_posix() for f in data["held_files"]]},
        "training": {"steps": run["steps"], "batch": args.batch, "seq_len": args.seq_len, "tokens": run["tokens"],
                     "seconds": round(run["seconds"], 1), "threads": args.threads, "lr": args.lr,
                     "min_lr_frac": args.min_lr_frac, "warmup": args.warmup, "weight_decay": args.weight_decay,
                     "mtp_weight": args.mtp_weight, "bias_rate": args.bias_rate, "seed": args.seed,
                     "final_imbalance": float(np.mean([h["imbalance"] for h in history[-20:]])),
                     "torch": torch.__version__},
        "heldout": run["final"],
        "evals": run["evals"],
        "reload_check": check,
        "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()}
                    for h in history[:: max(1, len(history) // 400)]],
    }


def write_record(out: Path, metrics: dict, run: dict) -> dict:
    """loss.png, then the checkpoint's size into `metrics`, metrics.json and README.md; returns metrics."""
    final = run["final"]
    plot(run["history"], run["evals"], out / "loss.png",
         f"demo model: held-out perplexity {final['perplexity']:.1f}, MTP accuracy {final['mtp_accuracy']:.1%}")
    metrics["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".safetensors", ".json"))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_readme(out, metrics)
    return metrics
