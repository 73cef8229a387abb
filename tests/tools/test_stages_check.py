"""tools/stages_check.py on the demo model: 2 stages against the one-graph build, within 1e-5."""

from tests.helpers import load_tool


def test_stages_check_on_demo(staged_demo_build, demo_build, tmp_path):
    out = load_tool("stages_check").main([str(staged_demo_build), str(demo_build), "--steps", "3", "--tokens", "8",
                                          "--prompts", "2", "--json", str(tmp_path / "check.json")])
    assert out["passed"] and all(v <= 1e-5 for v in out["max_rel_err"].values())
    assert len(out["stages"]) == 2 and all(g["identical"] for g in out["greedy"]) and (tmp_path / "check.json").is_file()
