"""tools/batching_check.py on the tiny build: together and staggered, every sequence equals alone."""

from tests.helpers import load_tool


def test_batching_check_on_tiny(tiny_build, tmp_path):
    out = load_tool("batching_check").main([str(tiny_build), "--prompts", "6", "--tokens", "8", "--long", "300",
                                            "--threads", "1", "--json", str(tmp_path / "check.json")])
    assert all(out["together_equal"]) and all(out["staggered_equal"]) and len(out["together_equal"]) == 6
    assert out["largest_batch"][0] == 6 and 1 < out["largest_batch"][1] <= 3
    assert out["long"]["tokens"] == 300 and (tmp_path / "check.json").is_file()
