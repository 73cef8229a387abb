"""engines.text: stop strings (the text ends before the first, and what could begin one is held
back), tokenizing with BOS, and TextOutput, the text a client sees, equal to decoding in one go."""

import pytest
from tokenizers import Tokenizer

from dsv3_export.engines.sampling import TokenLogprob
from dsv3_export.engines.text import StopStrings, TextOutput, final_text, tokenize
from dsv3_export.exporter.tokenizer_training import train_tokenizer


@pytest.mark.parametrize("pieces, stops, sent, stopped", [
    (["hel", "lo wor", "ld"], ["wor"], "hello ", True),
    (["ab", "c", "d"], ["cx"], "abcd", False),  # a held-back prefix that did not become a stop is released
    (["a", "b", "STO", "P", "c"], ["STOP"], "ab", True),
    (["x\ny", "z"], ["\n"], "x", True),
    (["abc"], [], "abc", False),
])
def test_stop_strings(pieces, stops, sent, stopped):
    s = StopStrings(stops)
    out = []
    for p in pieces:
        text, done = s.push(p)
        out.append(text)
        if done:
            break
    out.append(s.finish())
    assert "".join(out) == sent and s.stopped == stopped


def test_holds_back_what_could_begin_a_stop_string():
    s = StopStrings(["END", "\n\n"])
    assert s.push("abc E") == ("abc ", False)
    assert s.push("N") == ("", False)
    assert s.push("x") == ("ENx", False)
    assert s.push("y\n") == ("y", False)
    assert s.push("\nmore") == ("", True) and s.stopped
    assert s.push("late") == ("", True) and s.finish() == ""
    t = StopStrings(["END"])
    assert t.push("tail E") == ("tail ", False) and t.finish() == "E"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(512)


def test_tokenize_puts_bos_first_once(tokenizer):
    plain = tokenizer.encode("def main():").ids
    assert plain[0] != 0
    assert tokenize(tokenizer, "def main():", 0) == [0] + plain
    assert tokenize(tokenizer, "def main():", 0, add_bos=False) == plain
    assert tokenize(tokenizer, "def main():", None) == plain
    assert tokenize(tokenizer, "def main():", plain[0]) == plain  # already first: not added twice


def test_text_output_is_the_whole_decoding_sent_piece_by_piece(tokenizer):
    """Every piece joined is tokenizer.decode of all the tokens, multi-byte characters included
    (an incomplete one is held back, never sent as U+FFFD)."""
    text = "héllo → wörld ✓ def f(x):\n    return x\n"
    ids = tokenizer.encode(text).ids
    out = TextOutput(tokenizer)
    pieces = [out.push(t) for t in ids] + [out.finish()]
    assert "".join(pieces) == out.text == tokenizer.decode(ids) == final_text(tokenizer, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert out.token_ids == ids and not out.stopped and out.finish_reason("length") == "length"


def test_text_output_ends_at_a_stop_token_and_a_stop_string(tokenizer):
    ids = tokenizer.encode("alpha beta gamma").ids
    eos = 1
    out = TextOutput(tokenizer, stop_ids={eos})
    for t in ids + [eos] + ids:
        out.push(t, TokenLogprob(-0.5))
    out.finish()
    assert out.text == tokenizer.decode(ids) and out.token_ids == ids + [eos]
    assert len(out.logprobs) == len(ids) + 1 and out.finish_reason("length") == "stop"
    cut = TextOutput(tokenizer, stop_strings=["beta"])
    for t in ids:
        cut.push(t)
    cut.finish()
    assert cut.text == "alpha " and cut.stopped and cut.finish_reason("length") == "stop"


def test_text_output_without_a_tokenizer_keeps_ids_only():
    out = TextOutput(None, stop_ids={1})
    assert out.push(5) == "" and out.push(1) == "" and out.push(6) == ""
    assert out.token_ids == [5, 1] and out.stopped
