"""The text side of generation, one owner for each: tokenizing a prompt (BOS first), incremental
detokenization, stop strings with hold-back, and `TextOutput`, the text a client sees with its
token ids and log-probabilities. `Engine.generate`, `dsv3-export run`, the OpenAI server and the
Triton model all read their text through `TextOutput`.

Stop strings are matched on the decoded text, not mapped to token ids: a stop string rarely is one
token of a byte-level BPE, and the same text can come out as different tokens. The text ends just
before the first stop string; while the text could still be the start of one it is held back.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from dsv3_export.engines.sampling import TokenLogprob


def tokenize(tokenizer, text: str, bos: int | None, *, add_bos: bool = True) -> list[int]:
    """The tokenizer's ids for `text`, BOS first (once) when the model has one and `add_bos`."""
    ids = list(tokenizer.encode(text).ids)
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [int(bos)] + ids
    return ids


class TextStream:
    """Incremental detokenization: push token ids, get the new text (holds back incomplete UTF-8
    sequences; keeps a little context so tokenizers that strip a leading space decode right)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        full = self.tokenizer.decode(self.ids[self._prefix:])
        if full.endswith("\ufffd") or len(full) <= len(before):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return full[len(before):]

    def flush(self) -> str:
        """The text held back so far (an incomplete character at the end of the generation)."""
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        full = self.tokenizer.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return full[len(before):] if len(full) > len(before) else ""


class StopStrings:
    """Text in, text out, ending at the first stop string: holds back any tail that could begin one.

    push(piece) -> (text safe to send, stopped); finish() -> the held-back text (when no stop came)."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.stopped = True
            self.held = ""
            return text[:min(i for i, _ in hits)], True
        keep = 0  # the longest tail of text that is a proper prefix of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def finish(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


class TextOutput:
    """What one client sees of one generation: `push(token, logprob)` -> the text that token adds
    now ("" while a character or a possible stop string is incomplete, and for a stop token, which
    ends the text without being part of it); `finish()` -> the text held back until the end (an
    incomplete character, or what could have begun a stop string).

    `token_ids` / `logprobs` are the tokens the client is shown (up to the stop string or stop
    token, which is included); `text` everything sent so far; `stopped` whether a stop string or a
    stop token ended it. Without a tokenizer the text stays empty (ids only)."""

    def __init__(self, tokenizer, *, stop_strings: Iterable[str] = (), stop_ids: Iterable[int] = ()):
        self.stream = TextStream(tokenizer) if tokenizer is not None else None
        self.stops = StopStrings(stop_strings)
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self._sent: list[str] = []
        self.stop_token = False

    @property
    def text(self) -> str:
        return "".join(self._sent)

    @property
    def stopped(self) -> bool:
        return self.stops.stopped or self.stop_token

    def push(self, token: int, logprob: TokenLogprob | None = None) -> str:
        if self.stopped:
            return ""
        self.token_ids.append(int(token))
        if logprob is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids:  # it adds no text; what is held back comes with finish()
            self.stop_token = True
            return ""
        if self.stream is None:
            return ""
        return self._send(self.stops.push(self.stream.push(token))[0])

    def finish(self) -> str:
        """The text still held back (none once a stop string matched)."""
        if self.stream is None or self.stops.stopped:
            return ""
        return self._send(self.stops.push(self.stream.flush())[0] + self.stops.finish())

    def _send(self, piece: str) -> str:
        self._sent.append(piece)
        return piece

    def finish_reason(self, scheduler_reason: str | None) -> str:
        """"stop" for a stop string or token, else how the scheduler ended it ("length", ...)."""
        return "stop" if self.stopped else (scheduler_reason or "length")


def final_text(tokenizer, tokens: Sequence[int], stop_ids: Iterable[int] = (), stop_strings: Iterable[str] = ()) -> str:
    """The whole text of `tokens` as a client sees it (TextOutput over all of them)."""
    out = TextOutput(tokenizer, stop_strings=stop_strings, stop_ids=stop_ids)
    for t in tokens:
        out.push(t)
    out.finish()
    return out.text
