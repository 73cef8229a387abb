"""engines.stop_strings: text ends before the first stop string, and what could begin one is held back."""

import pytest

from dsv3_export.engines.stop_strings import StopStrings


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
