"""Generation over a build directory: the latent cache, streaming, plain and MTP-speculative decoding.

`Engine(build_dir)` (or `engines.load(build_dir)`) reads manifest.json, checks every file of the
build against its sha256 (core.build_dir), and opens the backend's session (ONNX Runtime or
TensorRT) for model.onnx. `forward` is one checked call of the graph contract (docs/design.md,
"Graph contract"), `step` the same call unchecked; `generate` runs prefill then one decode step per
token, carrying the per-layer latent cache `present_latent.{i}` -> `past_latent.{i}`, choosing
tokens with engines.sampling, or hands the loop to engines.speculative.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

import dsv3_export.engines.ort as ort_engine
import dsv3_export.engines.speculative as mtp_speculation
from dsv3_export.core.build_dir import (
    MANIFEST,
    MTP_GRAPH,
    TOKENIZER,
    VERIFY_DIR,
    Manifest,
    cache_layout,
    check_backend,
    check_file_hashes,
    main_io,
    read_manifest,
    stage_graphs,
    takes_buffers,
)
from dsv3_export.core.config import ModelConfig
from dsv3_export.core.errors import ExportError
from dsv3_export.engines.kv_cache import zero_cache
from dsv3_export.engines.sampling import SamplingParams, sample
from dsv3_export.engines.scheduler import Scheduler
from dsv3_export.engines.stages import StagedSession
from dsv3_export.engines.text import TextOutput, final_text, tokenize
from dsv3_export.engines.trt_profiles import max_batch as trt_max_batch


def prefix_in_buffer(prefix: np.ndarray, new: int) -> tuple[np.ndarray, np.ndarray]:
    """A cache prefix [B, T, ...] copied into a zeroed buffer with room for `new` rows, and its
    lengths (T per row): the prefix form over graph contract v2. The graph's present is then exactly
    the prefix grown by the new rows."""
    t = prefix.shape[1]
    buffer, = zero_cache(1, prefix.shape[0], t + new, prefix.shape[2:], prefix.dtype)
    buffer[:, :t] = prefix
    return buffer, np.full(prefix.shape[0], t, np.int64)


def check_token_ids(ids: np.ndarray, vocab: int) -> None:
    """Every id in 0..vocab-1, else one ExportError naming the first bad one."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
        raise ExportError(f"token id {bad} is out of range for this model (vocab size {vocab}: ids 0..{vocab - 1})")


def layout_hints(manifest: Manifest) -> list[str]:
    """One line each for what an older build's layout costs and a rebuild fixes (it still runs)."""
    hints = []
    graphs = manifest.engine.get("graphs") or {}
    if manifest.backend == "ort" and any("optimized" in g for g in graphs.values()):
        hints.append("this build holds saved optimized graphs (*.ort.onnx), which sessions no longer read "
                     "(they optimize as they load); rebuild it to drop them")
    return hints


def check_graphs(manifest: Manifest, stages: list[dict], sessions: Sequence, where: Path) -> None:
    """The manifest describes the graphs it sits beside, else one ExportError: its stages cover the
    config's layers in order, each graph's inputs and outputs are the ones recorded, and each stage
    takes the caches of exactly its layers (a mismatch would otherwise surface as a traceback from
    the engine at the first call)."""
    n_layers = int(manifest.config.get("n_layers", -1))
    ends = [0] + [s["layers"][1] for s in stages]
    if [s["layers"][0] for s in stages] != ends[:-1] or ends[-1] != n_layers:
        covered = [tuple(s["layers"]) for s in stages]
        raise ExportError(f"{where}: its stages cover layers {covered}, not 0..{n_layers - 1} (config n_layers) "
                          "in order; the build is inconsistent, rebuild it")
    for stage, sess in zip(stages, sessions):
        recorded = manifest.io.get(stage["file"])
        got = {"inputs": sorted(i.name for i in sess.get_inputs()),
               "outputs": sorted(o.name for o in sess.get_outputs())}
        for side in ("inputs", "outputs"):
            want = sorted(i["name"] for i in (recorded or {}).get(side, []))
            if want != got[side]:
                raise ExportError(f"{where}: the {side} it records for {stage['file']} are not the graph's "
                                  f"({', '.join(sorted(set(want) ^ set(got[side]))[:4]) or 'none recorded'} differ); "
                                  "the build is inconsistent, rebuild it")
        first, end = stage["layers"]
        caches = sorted(int(n.rsplit(".", 1)[1]) for n in got["inputs"] if n.startswith("past_latent."))
        if caches != list(range(first, end)):
            raise ExportError(f"{where}: {stage['file']} takes the caches of layers {caches}, the manifest gives it "
                              f"layers {first}..{end - 1}; the build is inconsistent, rebuild it")


# ---- results ----------------------------------------------------------------------------------------
@dataclass
class GenerationStats:
    batch: int
    prompt_tokens: int  # over the batch
    new_tokens: int  # emitted over the batch (stop tokens included, padding not)
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_s: float | None  # tokens from decode steps / decode seconds; None without any
    steps: int  # decode calls of the (main) graph after prefill
    # MTP speculation (generate(..., speculative=True)); None otherwise.
    acceptance_rate: float | None = None  # accepted drafts / drafts verified
    tokens_per_step: float | None = None  # tokens from decode steps / main-graph decode calls
    drafted_tokens: int | None = None  # MTP drafts checked by the main graph
    accepted_tokens: int | None = None  # of which accepted
    speculative: bool = False

    def summary(self) -> str:
        parts = [f"prompt {self.prompt_tokens} tokens", f"{self.new_tokens} new tokens",
                 f"prefill {self.prefill_seconds * 1000:.1f} ms"]
        if self.batch > 1:
            parts.insert(0, f"batch {self.batch}")
        if self.decode_tokens_per_s is not None:
            parts.append(f"decode {self.decode_tokens_per_s:.1f} tokens/s")
        if self.acceptance_rate is not None:
            parts.append(f"MTP acceptance {self.acceptance_rate:.0%}")
        if self.tokens_per_step is not None:
            parts.append(f"{self.tokens_per_step:.2f} tokens per main step")
        return ", ".join(parts)


@dataclass
class GenerationResult:
    """`ids`: the new tokens (a list; per-sequence lists for a batched prompt), up to and including
    a stop token. `text`: their decoding without the stop token (None without tokenizer.json).
    `finish_reason`: "stop" or "length" (per sequence for a batch)."""

    ids: list[int] | list[list[int]]
    text: str | list[str] | None
    stats: GenerationStats
    finish_reason: str | list[str] = "length"
    prompt_ids: list[int] | list[list[int]] = field(default_factory=list, repr=False)


# ---- the engine -------------------------------------------------------------------------------------

def _watching(on_token, outputs: list[TextOutput] | None):
    """on_token, with each row's tokens also fed to its TextOutput (stop strings): the callback
    returns True, ending that row, when on_token does or the row's text reached a stop string."""
    if outputs is None:
        return on_token

    def watch(row: int, token: int) -> bool:
        ended = on_token is not None and on_token(row, token) is True
        outputs[row].push(token)
        return ended or outputs[row].stops.stopped

    return watch

class Engine:
    """A loaded build: `forward` (one graph call) and `generate` (prefill + decode with the cache).

    backend: None = the manifest's; "ort" = ONNX Runtime (providers: None = CUDA when it works,
    else CPU; threads: intra-op threads); "trt" = TensorRT. check_files: verify every
    file's sha256 against the manifest (on by default; the escape hatch is for trusted, huge builds).
    """

    def __init__(self, build_dir: str | Path, *, backend: str | None = None,
                 providers: Iterable[str] | None = None, threads: int | None = None, check_files: bool = True):
        self.build_dir = Path(build_dir)
        self.manifest = read_manifest(self.build_dir)
        self.config = ModelConfig.from_dict(self.manifest.config, origin=str(self.build_dir / MANIFEST))
        verdict = self.manifest.verify
        if verdict is not None and verdict.get("passed") is False:
            raise ExportError(f"{self.build_dir}: this build failed verification (see "
                              f"{self.build_dir / VERIFY_DIR / 'report.md'}); rebuild it, or verify it again "
                              "with dsv3-export verify")
        self.backend = backend or self.manifest.backend
        check_backend(self.backend)
        if check_files:
            check_file_hashes(self.build_dir, self.manifest)
        if self.backend == "trt" and providers is not None:
            raise ExportError("execution providers apply to --backend ort only")
        self._providers = None if providers is None else list(providers)
        self._threads = threads
        self.stages = stage_graphs(self.manifest)  # model.onnx alone, or a `--stages N` build's stages
        stage_sessions = [self._open_session(Path(s["file"]).stem) for s in self.stages]
        check_graphs(self.manifest, self.stages, stage_sessions, self.build_dir / MANIFEST)
        self._chain = StagedSession(stage_sessions, [s["layers"] for s in self.stages])
        # The session of the main model: the graph's own, or the stages chained behind its interface.
        self.session = stage_sessions[0] if len(stage_sessions) == 1 else self._chain
        self.model_file: Path = stage_sessions[0].dsv3_model_path
        self._mtp_session = None
        self._mtp_outputs: list[str] | None = None
        self._outputs = [o.name for o in self.session.get_outputs()]
        cfg = self.config
        self.n_layers = cfg.n_layers
        self.latent_dim = cfg.latent_dim
        # One layer's cache as the graph declares it: the latent row, or per-head K|V (`--mla naive`).
        io = main_io(self.manifest)
        self.cache_shape, self.cache_dtype = cache_layout(io, self.latent_dim)
        # Graph contract v2: the graphs take cache buffers and their lengths, written in place.
        self.buffered = takes_buffers(io)
        # The most sequences one call takes: a TensorRT engine's profiles set it; ONNX Runtime has no limit.
        self.max_batch: int | None = None
        if self.backend == "trt":
            self.max_batch = min(trt_max_batch(s.profiles) for s in stage_sessions)
        self.tokenizer = self._load_tokenizer()
        self.hints = layout_hints(self.manifest)

    # ---- pieces ---------------------------------------------------------------------------------
    def _load_tokenizer(self):
        path = self.build_dir / TOKENIZER
        if not path.is_file():
            return None

        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:
            raise ExportError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0] if str(e) else e!r})") from None

    @property
    def mtp_session(self):
        """The MTP graph's session (opened on first use), or None when the build has no mtp.onnx."""
        if self._mtp_session is None and (self.build_dir / MTP_GRAPH).is_file():
            self._mtp_session = self._open_session("mtp")
        return self._mtp_session

    def _open_session(self, graph: str):
        """The backend's session for "model", "mtp" or a stage ("stage0"): each has onnxruntime's
        run(names, feeds)."""
        if self.backend == "trt":
            import dsv3_export.engines.trt as trt_engine  # lazy: TensorRT sessions are for GPU hosts only

            return trt_engine.session(self.build_dir, graph)
        # The MTP graph runs between main-graph calls (speculative decoding): its intra-op threads
        # must not busy-wait after each run, or they take the cores the main graph needs next
        # (measured: 0.7x -> 1.0-1.5x decode speed with two threads per session on 2 cores).
        return ort_engine.session(self.build_dir, graph, providers=self._providers, threads=self._threads,
                                  spin=graph != "mtp")

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return self.empty_buffers(batch, 0)

    def empty_mtp_past(self, batch: int) -> np.ndarray:
        return zero_cache(1, batch, 0, self.cache_shape, self.cache_dtype)[0]

    def tokenize(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text` with the build's tokenizer; BOS first (added when the tokenizer's own
        post-processor did not)."""
        if self.tokenizer is None:
            raise ExportError(f"{self.build_dir}: this build has no tokenizer.json; give token ids (--ids) instead of text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 (argv, a file read with errors)
            raise ExportError("the prompt is not valid UTF-8 text") from None
        return tokenize(self.tokenizer, text, self.config.bos_token_id, add_bos=add_bos)

    def decode(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([int(i) for i in ids])

    def stop_ids(self, stop: Iterable[int] | int | None = None) -> set[int]:
        """The config's EOS plus `stop`."""
        out = set() if self.config.eos_token_id is None else {int(self.config.eos_token_id)}
        if stop is not None:
            out |= {int(stop)} if isinstance(stop, (int, np.integer)) else {int(s) for s in stop}
        return out

    def check_ids(self, ids: np.ndarray) -> None:
        check_token_ids(ids, self.config.vocab_size)

    # ---- one graph call ---------------------------------------------------------------------------
    def forward(self, input_ids, past: Sequence[np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(logits [B,S,V], hidden_states [B,S,D], past: per-layer latents [B,T+S,C]) for input_ids
        [B,S] (a 1-D sequence is batch 1) after `past` (None: empty)."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ExportError(f"input_ids must be a non-empty [batch, seq] array, got shape {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise ExportError(f"input_ids must be integers, got {ids.dtype}")
        self.check_ids(ids)
        batch = ids.shape[0]
        if past is None:
            past = self.empty_past(batch)
        else:
            if len(past) != self.n_layers:
                raise ExportError(f"past must hold {self.n_layers} per-layer latents, got {len(past)}")
            past = [np.ascontiguousarray(p, dtype=self.cache_dtype) for p in past]
            rank = 2 + len(self.cache_shape)
            t = past[0].shape[1] if past[0].ndim == rank else -1
            for i, p in enumerate(past):
                if p.ndim != rank or p.shape[0] != batch or p.shape[1] != t or p.shape[2:] != self.cache_shape:
                    want = ", ".join(map(str, (batch, max(t, 0), *self.cache_shape)))
                    raise ExportError(f"past[{i}] must be [{want}], got {tuple(p.shape)}")
            if t + ids.shape[1] > self.config.max_seq_len:
                raise ExportError(f"past ({t}) + input ({ids.shape[1]}) tokens exceed the model's context "
                                  f"length (max_seq_len {self.config.max_seq_len})")
        return self.step(ids.astype(np.int64, copy=False), past)

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """`forward` without its checks: int64 ids [B, S] and the cached prefixes [B, T, ...]; returns
        the prefixes grown by S rows. Over a buffered build the prefixes are copied into fresh
        buffers first (the convenience form; the scheduler's `step_in_place` copies nothing)."""
        if self.buffered:
            buffers, lengths = zip(*(prefix_in_buffer(p, ids.shape[1]) for p in past))
            logits, hidden = self.step_in_place(ids, lengths[0], buffers)
            return logits, hidden, list(buffers)
        feeds = {"input_ids": ids, **{f"past_latent.{i}": p for i, p in enumerate(past)}}
        out = dict(zip(self._outputs, self.session.run(None, feeds)))
        return out["logits"], out["hidden_states"], [out[f"present_latent.{i}"] for i in range(self.n_layers)]

    def empty_buffers(self, batch: int, positions: int) -> list[np.ndarray]:
        """Zeroed cache buffers [batch, positions, *row] for every layer (graph contract v2)."""
        return zero_cache(self.n_layers, batch, positions, self.cache_shape, self.cache_dtype)

    def step_in_place(self, ids: np.ndarray, cache_lengths: np.ndarray,
                      buffers: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One call over cache buffers (graph contract v2): row b's S new tokens at positions
        cache_lengths[b]..+S-1, their latent rows written into buffers[i][b] in place (ONNX Runtime
        binds each buffer as both past and present). Returns (logits, hidden_states)."""
        return self._chain.run_in_place(np.ascontiguousarray(ids, np.int64),
                                        np.ascontiguousarray(cache_lengths, np.int64), buffers)

    # ---- generation -------------------------------------------------------------------------------
    def _prompt_rows(self, prompt, add_bos: bool) -> tuple[list[list[int]], bool]:
        """Each prompt's token ids, checked, and whether the prompt was a batch."""
        def is_int(x):
            return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

        if isinstance(prompt, str):
            if not prompt:
                raise ExportError("empty prompt")
            rows, batched = [self.tokenize(prompt, add_bos=add_bos)], False
        elif isinstance(prompt, np.ndarray):
            if prompt.dtype.kind not in "iu" or prompt.ndim not in (1, 2):
                raise ExportError(f"prompt ids must be a 1-D or 2-D integer array, got {prompt.dtype} {prompt.shape}")
            rows, batched = (prompt.tolist(), True) if prompt.ndim == 2 else ([prompt.tolist()], False)
        elif isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ExportError("empty prompt")
            if all(isinstance(p, str) for p in prompt):
                if any(not p for p in prompt):
                    raise ExportError("empty prompt in the batch")
                rows, batched = [self.tokenize(p, add_bos=add_bos) for p in prompt], True
            elif all(is_int(p) for p in prompt):
                rows, batched = [list(prompt)], False
            elif all(isinstance(p, (list, tuple, np.ndarray)) for p in prompt):
                rows, batched = [list(p) for p in prompt], True
                if not all(is_int(t) for r in rows for t in r):
                    raise ExportError("prompt ids must be integers")
            else:
                raise ExportError("prompt must be a string, a list of strings, a list of token ids, "
                                  "or a list of lists of token ids")
        else:
            raise ExportError(f"prompt must be text or token ids, got {type(prompt).__name__}")
        if any(len(r) == 0 for r in rows):
            raise ExportError("empty prompt")
        for r in rows:
            self.check_ids(np.asarray(r, dtype=np.int64))
        return [[int(t) for t in r] for r in rows], batched

    def generate(self, prompt, params: SamplingParams | None = None, *, max_new_tokens: int | None = None,
                 stop: Iterable[int] | int | None = None, stop_strings: Iterable[str] = (),
                 speculative: bool = False, on_token: Callable[[int, int], Any] | None = None,
                 add_bos: bool = True, **sampling) -> GenerationResult:
        """Continue `prompt`: a str, a list of str (a batch), a list of ids, a list of lists of ids (or
        a 1-D / 2-D integer array); a batch's prompts may have any lengths (continuous batching,
        engines.scheduler). `params` (engines.sampling.SamplingParams) and/or its fields as
        keywords (temperature, top_k, top_p, min_p, seed; `max_new_tokens` is its max_tokens):
        greedy by default, each sequence from its own numpy Generator seeded with `seed`. A
        sequence stops after emitting the config's EOS or one of `stop` (token ids), after its text
        contains one of `stop_strings` (the text is cut before it), or after max_tokens.
        `on_token(row, id)` is called for each emitted token as it is generated; when it returns
        True, that sequence ends there (finish_reason "stop")."""
        params = self.sampling_params(params, max_new_tokens, stop, **sampling)
        stop_strings = [s for s in stop_strings if s]
        if stop_strings and self.tokenizer is None:
            raise ExportError("stop strings need the build's tokenizer (tokenizer.json)")
        rows, batched = self._prompt_rows(prompt, add_bos)
        longest = max(len(r) for r in rows)
        if longest + params.max_tokens > self.config.max_seq_len:
            raise ExportError(f"prompt ({longest} tokens) + max_new_tokens ({params.max_tokens}) exceeds the "
                              f"model's context length (max_seq_len {self.config.max_seq_len})")
        if params.penalized and (speculative or not self.buffered):
            raise ExportError("repetition, presence and frequency penalties need the batched path: not with speculative "
                              "decoding, nor on a build whose graphs take no cache buffers (--mla naive)")
        outputs = [TextOutput(self.tokenizer, stop_strings=stop_strings, stop_ids=params.stop)
                   for _ in rows] if stop_strings else None
        on_token = _watching(on_token, outputs)
        if speculative:
            ids = self._speculative_ids(rows)
            return self._speculative_result(ids, batched, params.stop,
                                            mtp_speculation.decode(self, ids, params, on_token=on_token), outputs)
        if self.buffered:
            return self._generate_batched(rows, batched, params, on_token, outputs)
        if len({len(r) for r in rows}) > 1:
            raise ExportError(f"batched prompts must have the same length in tokens in this build (got lengths "
                              f"{', '.join(map(str, sorted({len(r) for r in rows})))}): its graphs take no cache "
                              "buffers (--mla naive, or an older build); rebuild it, or run them separately")
        ids = np.asarray(rows, dtype=np.int64)
        out = self._decode_loop(ids, params.max_tokens, params.stop, on_token,
                                lambda logits, rng: sample(logits, rng, params), np.random.default_rng(params.seed))
        return self._result(rows, batched, *out, params.stop, outputs=outputs)

    def sampling_params(self, params: SamplingParams | None = None, max_new_tokens: int | None = None,
                        stop: Iterable[int] | int | None = None, **sampling) -> SamplingParams:
        """`params` with the keyword fields applied and the build's stop ids (EOS, then `stop`),
        checked: SamplingError naming a bad field, ExportError for an unknown one or a stop id
        out of the vocabulary."""
        known = {f.name for f in SamplingParams.wire_fields()} - {"max_tokens"}
        unknown = sorted(set(sampling) - known)
        if unknown:
            raise ExportError(f"unknown sampling field(s) {', '.join(unknown)} (known: max_new_tokens, "
                              f"{', '.join(sorted(known))})")
        if max_new_tokens is not None:
            sampling["max_tokens"] = max_new_tokens
        params = (params or SamplingParams()).replace(**sampling)
        stops = self.stop_ids(stop) | params.stop
        for s in stops:
            if not 0 <= s < self.config.vocab_size:
                raise ExportError(f"stop token id {s} is out of range (vocab size {self.config.vocab_size})")
        return params.replace(stop=frozenset(stops))

    def _generate_batched(self, rows: list[list[int]], batched: bool, params: SamplingParams,
                          on_token, outputs=None) -> GenerationResult:
        """Every prompt through one scheduler at once: each prefilled whole, then decoded together."""
        scheduler = Scheduler(self, max_batch=len(rows), prefill_chunk=max(len(r) for r in rows))
        row_of: dict[int, int] = {}

        def notify(req, tok: int) -> None:
            if on_token(row_of[req.id], tok) is True:
                req.cancel()  # ends after this token; _result reports it as stopped
        for i, r in enumerate(rows):
            row_of[scheduler.submit(r, params, on_token=None if on_token is None else notify).id] = i
        requests = list(scheduler.waiting)
        scheduler.run()
        failed = next((r for r in requests if r.finish_reason == "error"), None)
        if failed is not None:
            raise ExportError(failed.error)
        st = scheduler.stats
        return self._result(rows, batched, [r.tokens for r in requests], st.prefill_seconds, st.decode_seconds,
                            st.decode_steps, params.stop, outputs=outputs)

    def _decode_loop(self, ids: np.ndarray, max_new_tokens: int, stops: set[int], on_token, pick, rng):
        batch = ids.shape[0]
        out: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        pad = min(stops) if stops else 0
        t0 = time.perf_counter()
        logits, _, past = self.step(ids, self.empty_past(batch))
        nxt = pick(logits[:, -1], rng)
        prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        steps = 0
        while True:
            for b in range(batch):
                if not done[b]:
                    tok = int(nxt[b])
                    out[b].append(tok)
                    if (on_token is not None and on_token(b, tok) is True) or tok in stops:
                        done[b] = True
            if done.all() or steps + 1 >= max_new_tokens:
                break
            feed = np.where(done, pad, nxt).astype(np.int64)[:, None]
            logits, _, past = self.step(feed, past)
            nxt = pick(logits[:, -1], rng)
            steps += 1
        decode = time.perf_counter() - t1 if steps else 0.0
        return out, prefill, decode, steps

    def mtp_step(self, input_ids: np.ndarray, hidden: np.ndarray, past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One mtp.onnx call: (draft logits [B,S,V] for tokens i+2, present_latent.mtp [B,T+S,C]) from
        tokens i+1 [B,S], the main model's h_i [B,S,D] and the MTP cache."""
        sess = self.mtp_session
        if self._mtp_outputs is None:
            self._mtp_outputs = [o.name for o in sess.get_outputs()]
        feeds = {"input_ids": input_ids.astype(np.int64, copy=False), "hidden_states": hidden, "past_latent.mtp": past}
        if self.buffered:  # the convenience form, as in `step`
            feeds["past_latent.mtp"], feeds["cache_lengths"] = prefix_in_buffer(past, input_ids.shape[1])
        out = dict(zip(self._mtp_outputs, sess.run(None, feeds)))
        return out["logits"], out["present_latent.mtp"]

    def _speculative_ids(self, rows: list[list[int]]) -> np.ndarray:
        """The one prompt speculation runs on, once it is sure to run: an MTP graph, one sequence."""
        if self.mtp_session is None:
            raise ExportError(f"{self.build_dir}: this build has no mtp.onnx; speculative decoding needs the MTP graph")
        if len(rows) != 1:
            raise ExportError(f"speculative decoding runs one sequence at a time (batch 1), got a batch of "
                              f"{len(rows)}; run the prompts one by one or without speculative decoding")
        return np.asarray(rows, dtype=np.int64)

    def _speculative_result(self, ids, batched, stops, run: mtp_speculation.SpeculativeRun,
                            outputs=None) -> GenerationResult:
        result = self._result(ids.tolist(), batched, [run.tokens], run.prefill_seconds, run.decode_seconds, run.steps, stops,
                              acceptance=run.acceptance_rate, outputs=outputs)
        st = result.stats
        st.speculative = True
        st.drafted_tokens, st.accepted_tokens, st.tokens_per_step = run.drafted, run.accepted, run.tokens_per_step
        return result

    def _result(self, rows, batched, out, prefill, decode, steps, stops, acceptance=None,
                outputs: list[TextOutput] | None = None) -> GenerationResult:
        """The result; with `outputs` (stop strings), each row's text and "stop" come from its TextOutput."""
        batch = len(rows)
        new = sum(len(r) for r in out)
        decoded_by_steps = new - batch
        stats = GenerationStats(
            batch=batch, prompt_tokens=sum(len(r) for r in rows), new_tokens=new, prefill_seconds=prefill,
            decode_seconds=decode, decode_tokens_per_s=(decoded_by_steps / decode) if steps and decode > 0 else None,
            steps=steps, acceptance_rate=acceptance)
        reasons = ["stop" if (r and r[-1] in stops) or (outputs is not None and outputs[b].stopped) else "length"
                   for b, r in enumerate(out)]
        texts = None
        if outputs is not None:
            for o in outputs:
                o.finish()  # what a possible stop string held back, when none came
            texts = [o.text for o in outputs]
        elif self.tokenizer is not None:
            texts = [final_text(self.tokenizer, r, stops) for r in out]
        prompts = [list(r) for r in rows]
        if batched:
            return GenerationResult(out, texts, stats, reasons, prompts)
        return GenerationResult(out[0], texts[0] if texts is not None else None, stats, reasons[0], prompts[0])

    def __repr__(self) -> str:
        return (f"Engine({str(self.build_dir)!r}, backend={self.backend!r}, "
                f"providers={self.session.get_providers()}, model={self.model_file.name})")
