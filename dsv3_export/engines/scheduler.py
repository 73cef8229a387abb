"""Continuous batching: many sequences of different lengths decoding together, joining and leaving at
any step (docs/design.md, "Continuous batching").

`submit(prompt ids, SamplingParams) -> Request`; `step()` runs one iteration:
1. cancelled requests leave, their slots free at once;
2. waiting requests are admitted while slots are free (FIFO), and prompt tokens are prefilled, at
   most `prefill_chunk` of them a step (several prompts in one call, a row each), so that a long
   prompt does not stall everyone's decode: a prompt is prefilled chunk by chunk and joins the
   batch with its first token;
3. one decode call over every running sequence, each at its own position (engines.kv_cache writes
   the step's rows in place), each sampled with its own settings and generator;
4. finished sequences leave.

A request's tokens reach it as they are made: iterate it (`for token in request`, from any thread),
`async for token in request.stream()` (from an event loop), or pass `on_token`. `run()` steps until
idle in the calling thread; `start()` runs steps in a background thread for servers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from dsv3_export.core.errors import ExportError
from dsv3_export.engines.kv_cache import BatchCache
from dsv3_export.engines.sampling import SamplingParams, TokenLogprob, apply_penalties, sample, token_logprob

_DONE = object()  # the stream's end marker
log = logging.getLogger(__name__)


def _message(e: BaseException) -> str:
    """A request's error text: our own errors as they are, anything else with its type."""
    return str(e) if isinstance(e, ExportError) else f"{type(e).__name__}: {e}"


def _log_failure(e: BaseException, where: str) -> None:
    """One log line for an error a request ends with; a traceback for what is not ours (a bug)."""
    if isinstance(e, ExportError):
        log.error("%s failed: %s", where, e)
    else:
        log.error("%s failed", where, exc_info=e)


class QueueFull(ExportError):
    """Back-pressure: the waiting queue is full; try again later."""


@dataclass(eq=False)
class Request:
    """One sequence in the scheduler: its prompt, settings, the tokens made so far and how it ended."""

    id: int
    prompt: list[int]
    params: SamplingParams
    on_token: Callable[[Request, int], Any] | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with params.logprobs set: logprobs[i] is tokens[i]'s
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _prefilled: int = 0
    _cache: list[np.ndarray] | None = None  # the private prefill buffer, until it joins the batch
    _rng: np.random.Generator | None = None
    _cancel: bool = False
    _queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    _done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None  # set by stream(): pushes wake it
    _wakeup: asyncio.Event | None = None

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Leave at the next step (its slot is then free); the stream ends with reason "cancelled"."""
        self._cancel = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def __iter__(self) -> Iterator[int]:
        """The tokens as they come (blocking); ends when the request finishes."""
        while (item := self._queue.get()) is not _DONE:
            yield item

    async def stream(self):
        """The tokens as they come, for an event loop (never blocks it: the scheduler's thread wakes
        the loop for each token)."""
        with self._lock:
            self._loop, self._wakeup = asyncio.get_running_loop(), asyncio.Event()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            if item is _DONE:
                return
            yield item

    def _push(self, item) -> None:
        with self._lock:
            self._queue.put(item)
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._wakeup.set)
                except RuntimeError:  # the client's loop is gone; nobody listens any more
                    self._loop = None

    def _emit(self, token: int, logprob: TokenLogprob | None = None) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if logprob is not None:  # before the token is visible: whoever reads token i finds its logprob
            self.logprobs.append(logprob)
        self.tokens.append(token)
        self._push(token)
        if self.on_token is not None:
            self.on_token(self, token)

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._cache = None
        self._push(_DONE)
        self._done.set()


@dataclass
class StepStats:
    """Totals over the scheduler's life: graph calls, tokens, seconds (for stats and metrics)."""

    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    prefill_calls: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    largest_batch: int = 0


class Scheduler:
    """Continuous batching over an engine whose graphs take cache buffers (graph contract v2).

    max_batch: sequences decoding at once (the cache's slots); max_waiting: requests queued beyond
    them before `submit` answers QueueFull; prefill_chunk: prompt tokens prefilled per step;
    on_step(batch size): called after each decode call (metrics), in the stepping thread."""

    def __init__(self, engine, *, max_batch: int = 8, max_waiting: int = 256, prefill_chunk: int = 256,
                 on_step: Callable[[int], Any] | None = None):
        if not getattr(engine, "buffered", False):
            raise ExportError(f"{engine.build_dir}: this build's graphs take no cache buffers (an older build, "
                              "or --mla naive); rebuild it with dsv3-export build to batch requests")
        for name, value in (("max_batch", max_batch), ("max_waiting", max_waiting), ("prefill_chunk", prefill_chunk)):
            if not isinstance(value, int) or value < 1:
                raise ExportError(f"{name} must be a positive integer, got {value!r}")
        limit = getattr(engine, "max_batch", None)
        if limit is not None and max_batch > limit:  # a decode step over more rows would fail every request
            raise ExportError(f"max_batch {max_batch} exceeds the {limit} sequences this build's engine takes in one "
                              f"call (its TensorRT profiles); use --max-batch {limit} or less, or rebuild with "
                              f"dsv3-export build --backend trt --max-batch {max_batch}")
        self.engine = engine
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self.cache = BatchCache(engine.n_layers, engine.cache_shape, engine.cache_dtype, max_batch, 0)
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []  # running[i] lives in cache slot i
        self.stats = StepStats()
        self.on_step = on_step
        self._ids = itertools.count()
        self._lock = threading.Lock()  # submit() from any thread; steps hold it only to take the queue
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- requests ---------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
               on_token: Callable[[Request, int], Any] | None = None) -> Request:
        """Queue a request; ExportError when it cannot run (empty, ids out of range, longer than the
        context), QueueFull when max_waiting requests already wait. `params` checked itself when made."""
        ids = [int(t) for t in prompt]
        if not ids:
            raise ExportError("empty prompt")
        self.engine.check_ids(np.asarray(ids))
        limit = self.engine.config.max_seq_len
        if len(ids) + params.max_tokens > limit:
            raise ExportError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                              f"context length (max_seq_len {limit})")
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (max_waiting {self.max_waiting})")
            req = Request(next(self._ids), ids, params, on_token, _rng=np.random.default_rng(params.seed))
            self.waiting.append(req)
            self._wake.notify()
        return req

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.running)

    # ---- one iteration ----------------------------------------------------------------------------
    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill()
        if self.running:
            self._decode()

    def run(self) -> None:
        """Step until every request has finished."""
        while not self.idle:
            self.step()

    def _drop_cancelled(self) -> None:
        with self._lock:
            for req in [r for r in self.waiting if r._cancel]:
                self.waiting.remove(req)
                req._finish("cancelled")
        for req in [r for r in self.prefilling if r._cancel]:
            self.prefilling.remove(req)
            req._finish("cancelled")
        for req in [r for r in self.running if r._cancel]:
            self._retire(req, "cancelled")

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and len(self.running) + len(self.prefilling) < self.max_batch:
                self.prefilling.append(self.waiting.popleft())

    def _prefill(self) -> None:
        """One prefill call of up to prefill_chunk (padded) prompt tokens: the oldest prefilling
        request's next chunk, and with it, one row each, the next requests' chunks while the rows
        still fit the budget at that width (one call over several prompts reads the weights once:
        `small`, 2 threads, four 150-token prompts in one call prefill 1.5x faster than one by one).
        A finished prompt samples its first token and joins the batch."""
        group = self._prefill_group()
        if not group:
            return
        width = group[0][1]
        ids = np.zeros((len(group), width), np.int64)  # shorter rows are padded: their rows stay hidden
        for i, (req, n) in enumerate(group):
            ids[i, :n] = req.prompt[req._prefilled:req._prefilled + n]
        lengths = np.asarray([req._prefilled for req, _ in group], np.int64)
        buffers = self.engine.empty_buffers(len(group), int(lengths.max()) + width)
        for i, (req, _) in enumerate(group):  # a prompt prefilled over several steps brings its rows
            if req._cache is not None:
                for buf, own in zip(buffers, req._cache):
                    buf[i, :req._prefilled] = own[0, :req._prefilled]
        t0 = time.perf_counter()
        try:
            logits, _ = self.engine.step_in_place(ids, lengths, buffers)
        except Exception as e:  # these requests fail; the others go on
            _log_failure(e, f"prefill of request(s) {', '.join(str(r.id) for r, _ in group)}")
            for req, _ in group:
                self.prefilling.remove(req)
                req._finish("error", _message(e))
            return
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += sum(n for _, n in group)
        self.stats.prefill_seconds += time.perf_counter() - t0
        for i, (req, n) in enumerate(group):
            req._prefilled += n
            req._cache = [b[i:i + 1, :req._prefilled] for b in buffers]
            if req._prefilled == len(req.prompt):
                self.prefilling.remove(req)
                try:
                    self._join(req, logits[i, n - 1])
                except Exception as e:  # e.g. no memory for a larger cache: this request fails, nobody waits
                    _log_failure(e, f"request {req.id} joining the batch")
                    self._fail(req, _message(e))

    def _prefill_group(self) -> list[tuple[Request, int]]:
        """(request, tokens) of the next prefill call: the first request's chunk sets the width; a
        later request joins while (rows + 1) x width fits prefill_chunk and its padded positions
        stay within the context."""
        group: list[tuple[Request, int]] = []
        limit = self.engine.config.max_seq_len
        for req in self.prefilling:
            remaining = len(req.prompt) - req._prefilled
            if not group:
                group.append((req, min(remaining, self.prefill_chunk)))
                continue
            width = group[0][1]
            if (len(group) + 1) * width > self.prefill_chunk:
                break
            if req._prefilled + width <= limit:
                group.append((req, min(remaining, width)))
        return group

    def _join(self, req: Request, last_logits: np.ndarray) -> None:
        """The prefilled request takes the next slot and emits its first token."""
        need = max([len(r.prompt) + r.params.max_tokens for r in self.running] +
                   [len(req.prompt) + req.params.max_tokens])
        self.cache.ensure(need)
        slot = len(self.running)
        self.cache.load(slot, req._cache, len(req.prompt))
        req._cache = None
        self.running.append(req)
        self._choose(req, last_logits)

    def _decode(self) -> None:
        n = len(self.running)
        ids = np.asarray([[r.tokens[-1]] for r in self.running], np.int64)
        lengths = self.cache.lengths[:n].copy()
        t0 = time.perf_counter()
        try:
            logits, _ = self.engine.step_in_place(ids, lengths, self.cache.views(0, n))
        except Exception as e:  # every running sequence was in this call; those waiting go on
            _log_failure(e, f"decode step of {n} sequence(s)")
            for req in list(self.running):
                self._retire(req, "error", _message(e))
            return
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.decode_tokens += n
        self.stats.largest_batch = max(self.stats.largest_batch, n)
        if self.on_step is not None:
            self.on_step(n)
        self.cache.lengths[:n] += 1
        for req, row in zip(list(self.running), logits[:, -1]):
            self._choose(req, row)

    def _choose(self, req: Request, row: np.ndarray) -> None:
        """Sample `req`'s next token from its logits [V] (with its log-probability when asked) and
        emit it; unusable logits, or a failing `on_token`, end this request alone."""
        p = req.params
        try:
            token = int(sample(apply_penalties(row, p, req.prompt, req.tokens)[None], req._rng, p)[0])
            req._emit(token, token_logprob(row, token, p.logprobs) if p.logprobs is not None else None)
        except Exception as e:
            if not isinstance(e, ExportError):
                _log_failure(e, f"request {req.id} choosing its next token")
            self._fail(req, _message(e))
            return
        if token in req.params.stop:
            self._retire(req, "stop")
        elif len(req.tokens) >= req.params.max_tokens:
            self._retire(req, "length")

    def _fail(self, req: Request, error: str) -> None:
        """End `req` with an error wherever it is: running (its slot freed), or already out of every list."""
        if req in self.running:
            self._retire(req, "error", error)
        elif not req.finished:
            req._finish("error", error)

    def _retire(self, req: Request, reason: str, error: str | None = None) -> None:
        """Leave the batch: the last running sequence moves into the freed slot."""
        slot = self.running.index(req)
        last = len(self.running) - 1
        if slot != last:
            self.cache.move(last, slot)
            self.running[slot] = self.running[last]
        else:
            self.cache.lengths[slot] = 0
        self.running.pop()
        req._finish(reason, error)

    # ---- background thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Run steps in a daemon thread whenever there is work (servers); `stop()` ends it."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dsv3-scheduler", daemon=True)
        self._thread.start()

    def cancel_all(self) -> None:
        """Cancel every request taken on (from any thread): each leaves at the next step, its stream
        ending with reason "cancelled"."""
        with self._lock:
            requests = list(self.waiting) + list(self.prefilling) + list(self.running)
            self._wake.notify()
        for req in requests:
            req.cancel()

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.idle and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug must not leave clients waiting forever
                _log_failure(e, "a scheduler step; failing every request it holds")
                for req in list(self.waiting) + self.prefilling + self.running:
                    req._finish("error", _message(e))
                self.waiting.clear()
                self.prefilling.clear()
                self.running.clear()
                self.cache.lengths[:] = 0
