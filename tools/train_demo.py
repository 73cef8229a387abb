"""Train the embedded demo model: a small DeepSeek-V3-architecture model on the Python standard library.

    nice -n 19 python tools/train_demo.py --out exporter/data/demo --minutes 25

What it trains is the reference `exporter.model.Transformer` itself (the "demo" preset of
exporter/config.py: MLA with q compression, a dense first layer then MoE with sigmoid routing, one
shared expert and the auxiliary-loss-free correction bias, one MTP layer), naive MLA (per-head K/V),
under `Transformer.training_form()`: the two custom ops' plain-torch references, which autograd
differentiates (`torch.library.custom_op` has no autograd formula registered, so the ops themselves
stop gradients), and fused attention without a cache. The absorbed form the exporter uses is the same
function of the same weights; `verify_checkpoint` proves the written checkpoint reproduces the trained
model's logits.

- Data: the interpreter's own standard library sources (no network), one file per document
  (BOS ... EOS), files split into train and held-out by a hash of their path.
- Tokenizer: byte-level BPE trained by `tokenizers` on the train split; BOS = 0, EOS = 1.
- Loss: next-token cross-entropy + `--mtp-weight` (λ, DeepSeek-V3 uses 0.3 early) × the MTP head's
  cross-entropy on token i+2 (its input: the main model's final-normed h_i and the embedding of
  token i+1; its output head is the main model's, shared, as in DeepSeek-V3).
- Routing balance, auxiliary-loss-free (DeepSeek-V3 §2.1.2): after every step each MoE layer's
  correction bias moves by γ·sign(mean load − load_e); the bias only affects which experts are
  selected, never the gating weights.
- AdamW, linear warm-up then cosine decay; the schedule runs over `--steps` or, by default, over a
  wall-clock budget (`--minutes`), so the run fits its time whatever the machine's load.

Writes OUT/: config.json + model.safetensors (Hugging Face layout, bf16, router fp32, MTP layer under
`model.layers.{n_layers}.`), tokenizer.json, loss.png, metrics.json and README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv3_export.core.config import ModelConfig, preset  # noqa: E402
from dsv3_export.exporter import names  # noqa: E402
from dsv3_export.exporter.checkpoint_writer import write_hf  # noqa: E402
from dsv3_export.exporter.model import MoE, Transformer  # noqa: E402
from dsv3_export.exporter.tokenizer_training import BOS, EOS, train_bpe  # noqa: E402


def _load_sibling(name: str):
    """A script module of tools/ loaded by path (tools/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load_sibling("demo_report")

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages",
                 # Data more than code: codec tables (1.4 MB) and pydoc's topic texts (0.8 MB).
                 "encodings", "pydoc_data"}


# ---- data ---------------------------------------------------------------------------------------
def corpus(max_bytes: int | None = None, heldout_frac: float = 0.05) -> tuple[list[Path], list[Path]]:
    """The standard library's .py files (tests left out), sorted, split into (train, held-out) by a
    hash of the path relative to the stdlib (the same split on every machine with that Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py")
                   if not EXCLUDED_DIRS.intersection(f.relative_to(root).parts[:-1]) and f.is_file())
    train, held = [], []
    total = 0
    for f in files:
        h = int.from_bytes(hashlib.sha256(f.relative_to(root).as_posix().encode()).digest()[:4], "little")
        (held if h / 2**32 < heldout_frac else train).append(f)
        total += f.stat().st_size
        if max_bytes and total >= max_bytes:
            break
    if not held and len(train) > 1:  # a small corpus may hash no file out: keep one back anyway
        held.append(train.pop())
    return train, held


def read_text(f: Path) -> str:
    return f.read_text(encoding="utf-8", errors="replace")


def encode_files(tok, files: list[Path], bos: int = 0, eos: int = 1) -> np.ndarray:
    """One stream: BOS file EOS BOS file EOS …"""
    encs = tok.encode_batch([read_text(f) for f in files])
    parts = [np.asarray([bos] + e.ids + [eos], dtype=np.int64) for e in encs]
    return np.concatenate(parts)


# ---- the model in training form -------------------------------------------------------------------
def make_model(cfg: ModelConfig, seed: int) -> Transformer:
    """The reference Transformer (naive MLA, gate bias, MTP), initialised and made trainable. The
    MTP head is the main head (one Parameter), as DeepSeek-V3 shares its output head."""
    torch.manual_seed(seed)
    model = Transformer(cfg, dtype=torch.float32, mla="naive", has_gate_bias=True, mtp=True)
    out_std = 0.02 / math.sqrt(2 * (cfg.n_layers + cfg.n_mtp_layers))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)  # norms
            elif name.endswith(("wo.weight", "w2.weight", "w_down")):
                p.normal_(0.0, out_std)  # residual-branch outputs, GPT-2 style
            else:
                p.normal_(0.0, 0.02)
    for m in model.mtp:
        m.head.weight = model.head.weight
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith("gate.bias"))  # the bias follows the balance rule, not gradients
    return model


def moe_layers(model: Transformer) -> list[tuple[str, MoE]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


class LoadMeter:
    """Tokens routed to each expert per MoE layer since the last `take()` (forward hooks on the gates)."""

    def __init__(self, model: Transformer):
        self.loads: dict[str, torch.Tensor] = {}
        self.handles = []
        for name, moe in moe_layers(model):
            self.handles.append(moe.gate.register_forward_hook(self._hook(name, moe.gate.cfg.n_routed_experts)))

    def _hook(self, name: str, n_experts: int):
        def hook(module, inputs, output):
            idx = output[1].detach().flatten()
            counts = torch.bincount(idx, minlength=n_experts).float()
            self.loads[name] = self.loads.get(name, 0) + counts
        return hook

    def take(self) -> dict[str, torch.Tensor]:
        out, self.loads = self.loads, {}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def update_bias(model: Transformer, loads: dict[str, torch.Tensor], rate: float) -> float:
    """b_e += γ·sign(mean load − load_e) per MoE layer (DeepSeek-V3 §2.1.2); returns the mean over
    layers of max load / mean load (1.0 = perfectly balanced)."""
    imbalance = []
    modules = dict(moe_layers(model))
    with torch.no_grad():
        for name, load in loads.items():
            bias = modules[name].gate.bias
            bias.add_(rate * torch.sign(load.mean() - load))
            imbalance.append((load.max() / load.mean().clamp_min(1e-9)).item())
    return float(np.mean(imbalance)) if imbalance else 1.0


def losses(model: Transformer, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(main CE, MTP CE, extras) on a [B, L+1] batch: main predicts token i+1 at position i; the
    MTP head, fed h_i and token i+1, predicts token i+2."""
    x, y = batch[:, :-1], batch[:, 1:]
    out = model(x)
    main = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    mtp_logits, _ = model.mtp_forward(x[:, 1:], out.hidden_states[:, :-1])
    mtp = F.cross_entropy(mtp_logits.flatten(0, 1), y[:, 1:].flatten())
    return main, mtp, {"logits": out.logits, "mtp_logits": mtp_logits}


@torch.no_grad()
def evaluate(model: Transformer, data: np.ndarray, seq_len: int, max_windows: int = 48, batch: int = 8) -> dict:
    """Held-out: perplexity, next-token accuracy, MTP accuracy on token i+2, and how often the MTP
    draft equals the main model's own greedy prediction for that token (teacher-forced greedy
    acceptance: the figure speculative decoding gets when both see the same prefix)."""
    model.eval()
    n = min(max_windows, (len(data) - 1) // (seq_len + 1))
    wins = torch.from_numpy(np.stack([data[i * (seq_len + 1):(i + 1) * (seq_len + 1)] for i in range(n)]))
    tot = {"nll": 0.0, "mtp_nll": 0.0, "n": 0, "n_mtp": 0, "acc": 0, "mtp_acc": 0, "agree": 0}
    for s in range(0, n, batch):
        b = wins[s:s + batch]
        main, mtp, extra = losses(model, b)
        y = b[:, 1:]
        tot["nll"] += main.item() * y.numel()
        tot["mtp_nll"] += mtp.item() * y[:, 1:].numel()
        tot["n"] += y.numel()
        tot["n_mtp"] += y[:, 1:].numel()
        pred = extra["logits"].argmax(-1)
        draft = extra["mtp_logits"].argmax(-1)
        tot["acc"] += (pred == y).sum().item()
        tot["mtp_acc"] += (draft == y[:, 1:]).sum().item()
        tot["agree"] += (draft == pred[:, 1:]).sum().item()
    model.train()
    return {"loss": tot["nll"] / tot["n"], "perplexity": math.exp(tot["nll"] / tot["n"]),
            "mtp_loss": tot["mtp_nll"] / tot["n_mtp"], "accuracy": tot["acc"] / tot["n"],
            "mtp_accuracy": tot["mtp_acc"] / tot["n_mtp"], "mtp_agreement": tot["agree"] / tot["n_mtp"],
            "tokens": tot["n"]}


# ---- writing the checkpoint ------------------------------------------------------------------------
def canonical_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The trained parameters under DeepSeek's canonical names (exporter/names.py): experts unstacked
    into w1/w3/w2, the MTP block as layer n_layers with shared_head.norm. The MTP layer's copies of
    the embedding and head are left out (optional; the loaders use the main model's, which is what
    the MTP was trained with)."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    inter = cfg.moe_inter_dim

    def block(prefix_model: str, prefix_ckpt: str, params: dict[str, torch.Tensor]):
        for rest, t in params.items():
            if rest == "ffn.w_gate_up":
                for e in range(t.shape[0]):
                    out[f"{prefix_ckpt}.ffn.experts.{e}.w1.weight"] = t[e, :inter]
                    out[f"{prefix_ckpt}.ffn.experts.{e}.w3.weight"] = t[e, inter:]
            elif rest == "ffn.w_down":
                for e in range(t.shape[0]):
                    out[f"{prefix_ckpt}.ffn.experts.{e}.w2.weight"] = t[e]
            else:
                out[f"{prefix_ckpt}.{rest}"] = t

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        t = p.detach()
        parts = fqn.split(".")
        if parts[0] == "layers":
            groups.setdefault(f"layers.{parts[1]}", {})[".".join(parts[2:])] = t
        elif parts[0] == "mtp":
            p_ckpt = f"layers.{cfg.n_layers + int(parts[1])}"
            rest = ".".join(parts[2:])
            if rest.startswith("block."):
                groups.setdefault(p_ckpt, {})[rest[len("block."):]] = t
            elif rest == "norm.weight":
                out[f"{p_ckpt}.shared_head.norm.weight"] = t
            elif rest == "head.weight":
                continue  # the shared main head
            else:
                out[f"{p_ckpt}.{rest}"] = t
        else:
            out[fqn] = t
    for prefix, params in groups.items():
        block(prefix, prefix, params)
    want = names.expected_shapes(cfg)
    missing = [n for n in want if n not in out and not names.optional(n)]
    extra = [n for n in out if n not in want]
    if missing or extra:
        raise RuntimeError(f"canonical names do not match the config: missing {missing[:3]}, extra {extra[:3]}")
    for n, t in out.items():
        if tuple(t.shape) != want[n]:
            raise RuntimeError(f"{n}: shape {tuple(t.shape)}, config implies {want[n]}")
    return {n: out[n] for n in want if n in out}  # the config's order


class TensorSource:
    """A weight source (exporter/weights.py's protocol) over canonical tensors in memory, for
    exporter.checkpoint_writer.write_hf."""

    fp8 = False
    block = (128, 128)

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor]):
        self.config, self.tensors = config, tensors
        self.shapes = {n: tuple(t.shape) for n, t in tensors.items()}
        self.has_mtp = config.n_mtp_layers > 0

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def is_fp8(self, name: str) -> bool:
        return False

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name].float()


def stored_value(name: str, t: torch.Tensor) -> torch.Tensor:
    """What write_hf stores for a tensor, read back as fp32: bf16 except the router (fp32)."""
    if name.endswith((".gate.weight", ".gate.bias")):
        return t.float()
    return t.to(torch.bfloat16).float()


def round_to_stored(model: Transformer) -> None:
    """Make the model's parameters the values the checkpoint stores (so metrics describe the shipped model)."""
    with torch.no_grad():
        for fqn, p in model.named_parameters():
            p.copy_(stored_value(fqn, p))


def write_checkpoint(model: Transformer, tok, out: Path) -> None:
    cfg = model.cfg.replace(weight_dtype="bf16")
    out.mkdir(parents=True, exist_ok=True)
    write_hf(TensorSource(cfg, canonical_state(model)), out, dtype="bf16")
    tok.save(str(out / "tokenizer.json"))


@torch.no_grad()
def verify_checkpoint(model: Transformer, path: Path, data: np.ndarray, seq_len: int = 128) -> dict:
    """Load the written checkpoint with exporter.load_reference (absorbed MLA, the custom ops) and
    compare its logits and MTP logits with the trained model's in its training form (naive MLA,
    fused attention, plain ops)."""
    from dsv3_export.exporter import load_reference

    ref = load_reference(path)
    ids = torch.from_numpy(np.asarray(data[: seq_len + 1], dtype=np.int64))[None]
    model.eval()
    with model.training_form():
        a = model(ids[:, :-1])
        am, _ = model.mtp_forward(ids[:, 1:], a.hidden_states)
    model.train()
    b = ref(ids[:, :-1])
    bm, _ = ref.mtp_forward(ids[:, 1:], b.hidden_states)
    err = ((a.logits - b.logits).abs().max() / a.logits.abs().max()).item()
    mtp_err = ((am - bm).abs().max() / am.abs().max()).item()
    return {"logits_rel_err": err, "mtp_logits_rel_err": mtp_err,
            "greedy_equal": bool((a.logits.argmax(-1) == b.logits.argmax(-1)).all())}


# ---- main -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="exporter/data/demo", help="Output checkpoint directory (replaced).")
    ap.add_argument("--preset", default="demo", help="Model shape (a preset of exporter/config.py).")
    ap.add_argument("--config-json", default=None, help="Overrides of the preset's fields, as JSON.")
    ap.add_argument("--minutes", type=float, default=25.0, help="Wall-clock budget of the training loop.")
    ap.add_argument("--steps", type=int, default=None, help="A fixed step count instead of the time budget.")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=320)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--mtp-weight", type=float, default=0.3, help="λ, the MTP loss weight.")
    ap.add_argument("--bias-rate", type=float, default=1e-2,
                    help="γ, the correction-bias update speed (DeepSeek-V3: 1e-3 over ~10^5 steps; a run of a few "
                         "hundred steps needs it larger to balance at all).")
    ap.add_argument("--heldout-frac", type=float, default=0.05)
    ap.add_argument("--corpus-bytes", type=int, default=None, help="Use only the first N bytes of sources.")
    ap.add_argument("--eval-every", type=float, default=150.0, help="Seconds between held-out evaluations.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def prepare_data(args: argparse.Namespace, started: float) -> tuple[ModelConfig, object, dict]:
    """(config with the tokenizer's vocabulary and an MTP layer, tokenizer, data): the corpus split,
    a BPE trained on the train split, both splits encoded."""
    cfg = preset(args.preset)
    if args.config_json:
        cfg = cfg.replace(**json.loads(args.config_json))
    cfg = cfg.replace(n_mtp_layers=max(cfg.n_mtp_layers, 1))
    train_files, held_files = corpus(args.corpus_bytes, args.heldout_frac)
    tok = train_bpe(train_files, cfg.vocab_size)
    if tok.token_to_id(BOS) != 0 or tok.token_to_id(EOS) != 1:
        raise RuntimeError("tokenizer special tokens are not BOS=0, EOS=1")
    cfg = cfg.replace(vocab_size=tok.get_vocab_size()) if tok.get_vocab_size() != cfg.vocab_size else cfg
    data = {"train_files": train_files, "held_files": held_files,
            "train_ids": encode_files(tok, train_files), "held_ids": encode_files(tok, held_files)}
    print(f"data: {len(train_files)} train files ({len(data['train_ids']) / 1e6:.2f} M tokens), {len(held_files)} "
          f"held-out ({len(data['held_ids']) / 1e6:.2f} M tokens); tokenizer {time.time() - started:.0f} s", flush=True)
    return cfg, tok, data


def make_optimizer(model: Transformer, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices except the embedding."""
    def decayed(n, p):
        return p.ndim >= 2 and n != "embed.weight"

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for n, p in params if decayed(n, p)], "weight_decay": args.weight_decay},
                              {"params": [p for n, p in params if not decayed(n, p)], "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def heldout_eval(model: Transformer, meter: LoadMeter, held_ids: np.ndarray, seq_len: int) -> dict:
    """A held-out evaluation mid-run; the tokens it routes stay out of the balance rule."""
    meter_state = meter.take()
    e = evaluate(model, held_ids, seq_len, max_windows=16)
    meter.take()
    meter.loads = meter_state
    return e


def train(model: Transformer, train_ids: np.ndarray, held_ids: np.ndarray, args: argparse.Namespace) -> dict:
    """The training loop in the model's training form, then the parameters rounded to the stored
    values and the final held-out evaluation. Returns the run's record."""
    rng = np.random.default_rng(args.seed)
    opt = make_optimizer(model, args)
    meter = LoadMeter(model)
    history: list[dict] = []
    evals: list[dict] = []
    budget = args.minutes * 60
    seen = step = 0
    t0 = last_eval = time.time()

    def progress() -> float:
        return step / args.steps if args.steps else (time.time() - t0) / budget

    with model.training_form():
        while progress() < 1.0:
            frac = progress()
            warm = min(1.0, (step + 1) / args.warmup)
            lr = args.lr * warm * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            starts = rng.integers(0, len(train_ids) - args.seq_len - 1, size=args.batch)
            batch = torch.from_numpy(np.stack([train_ids[s:s + args.seq_len + 1] for s in starts]))
            main_loss, mtp_loss, _ = losses(model, batch)
            loss = main_loss + args.mtp_weight * mtp_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0).item()
            opt.step()
            imbalance = update_bias(model, meter.take(), args.bias_rate)
            step += 1
            seen += batch[:, :-1].numel()
            history.append({"step": step, "tokens": seen, "loss": main_loss.item(), "mtp_loss": mtp_loss.item(),
                            "lr": lr, "grad_norm": gnorm, "imbalance": imbalance, "t": time.time() - t0})
            if step % 10 == 0 or step <= 3:
                print(f"step {step} tokens {seen / 1e6:.2f}M loss {main_loss.item():.3f} mtp {mtp_loss.item():.3f} "
                      f"lr {lr:.2e} imbalance {imbalance:.2f} {time.time() - t0:.0f}s", flush=True)
            if time.time() - last_eval > args.eval_every:
                e = heldout_eval(model, meter, held_ids, args.seq_len)
                e.update(step=step, tokens_seen=seen, t=time.time() - t0)
                evals.append(e)
                print(f"  held-out: ppl {e['perplexity']:.2f} mtp acc {e['mtp_accuracy']:.3f} "
                      f"agree {e['mtp_agreement']:.3f}", flush=True)
                last_eval = time.time()
        train_seconds = time.time() - t0
        meter.close()
        round_to_stored(model)
        final = evaluate(model, held_ids, args.seq_len, max_windows=64)
        final.update(step=step, tokens_seen=seen, t=train_seconds)
        evals.append(final)
    print(f"final held-out: {json.dumps(final)}", flush=True)
    return {"history": history, "evals": evals, "final": final, "steps": step, "tokens": seen,
            "seconds": train_seconds}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    cfg, tok, data = prepare_data(args, started)
    model = make_model(cfg, args.seed)
    model.train()
    run = train(model, data["train_ids"], data["held_ids"], args)

    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(model, tok, tmp)
    check = verify_checkpoint(model, tmp, data["held_ids"])
    print(f"checkpoint reload: {check}", flush=True)
    if check["logits_rel_err"] > 1e-4 or check["mtp_logits_rel_err"] > 1e-4:
        raise RuntimeError(f"the written checkpoint does not reproduce the trained model: {check}")

    command = "nice -n 19 python tools/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    metrics = report.write_record(tmp, report.metrics(command, args, cfg, data, run, check), run)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {out} ({metrics['bytes'] / 2**20:.1f} MiB) in {(time.time() - started) / 60:.1f} min", flush=True)
    return metrics


if __name__ == "__main__":
    main()
