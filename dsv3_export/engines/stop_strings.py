"""Stop strings over streamed text: the text of a generation ends before the first of them (the
OpenAI server's `stop` and the Triton model's `stop`). A stop string rarely is one token of a
byte-level BPE, and the same text can come out as different tokens, so they are matched on the
decoded text, not mapped to token ids."""

from __future__ import annotations


class StopStrings:
    """Text in, text out, ending at the first stop string: holds back any tail that could begin one.

    push(piece) -> (text safe to send, stopped); finish() -> the held-back text (when no stop came)."""

    def __init__(self, stops: list[str]):
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
