"""tools/llamacpp_compare.py: llama-bench's records read right and paired with benchmarks.bench's figures;
the end-to-end run needs a built llama.cpp tree (DSV3_LLAMA_CPP), so it skips without one."""

import os

import pytest

from tests.helpers import load_tool


def _tool():
    return load_tool("llamacpp_compare")


# Fields as llama-bench -o json writes them (tools/llama-bench/llama-bench.cpp), trimmed.
RECORDS = [
    {"n_prompt": 128, "n_gen": 0, "n_depth": 0, "avg_ts": 387.5, "stddev_ts": 12.0, "samples_ts": [375.0, 400.0]},
    {"n_prompt": 1024, "n_gen": 0, "n_depth": 0, "avg_ts": 308.6, "stddev_ts": 3.0, "samples_ts": [305.6, 311.6]},
    {"n_prompt": 0, "n_gen": 16, "n_depth": 128, "avg_ts": 60.3, "stddev_ts": 0.5, "samples_ts": [59.8, 60.8]},
    {"n_prompt": 0, "n_gen": 16, "n_depth": 1024, "avg_ts": 52.1, "stddev_ts": 1.0, "samples_ts": [51.1, 53.1]},
]


def test_llama_bench_records_become_prefill_and_decode_rows():
    rows = _tool().llama_rows(RECORDS)
    assert sorted(rows["prefill"]) == [128, 1024] and sorted(rows["decode"]) == [128, 1024]
    assert rows["decode"][1024]["tokens_per_s"] == 52.1
    assert rows["prefill"][128]["min"] == 375.0 and rows["prefill"][128]["max"] == 400.0


def test_compare_pairs_only_what_both_measured():
    tool = _tool()
    ours = {"prefill": {"1024": {"tokens_per_s": 479.4}},
            "decode": {"128": {"tokens_per_s": 54.7}, "4096": {"tokens_per_s": 33.8}}}  # benchmarks.bench: str keys
    rows = tool.compare(ours, tool.llama_rows(RECORDS))
    assert [(r["phase"], r["tokens"]) for r in rows] == [("prefill", 1024), ("decode", 128)]
    assert rows[0]["ratio"] == pytest.approx(479.4 / 308.6) and rows[1]["ratio"] == pytest.approx(54.7 / 60.3)
    assert "bound" not in rows[1]  # bench measured no bound here


def test_decode_rows_carry_the_memory_bound_and_each_side_s_reach():
    tool = _tool()
    ours = {"prefill": {}, "decode": {"1024": {"tokens_per_s": 45.0}}}
    runs = [{"memory_bound": {"decode": {"1024": {"tokens_per_s": t}}}} for t in (60.0, 70.0, 64.0)]
    ours["memory_bound"] = tool._median_bound(runs)
    [row] = tool.compare(ours, tool.llama_rows(RECORDS))
    assert row["bound"] == 64.0
    assert row["ours_reached"] == pytest.approx(45.0 / 64.0) and row["llama_cpp_reached"] == pytest.approx(52.1 / 64.0)


def test_rounds_reduce_to_medians_per_measurement():
    tool = _tool()
    runs = [{"prefill": {"128": {"tokens_per_s": t}}, "decode": {"1024": {"tokens_per_s": 10 * t}, "4096": {"tokens_per_s": 1}}}
            for t in (3.0, 1.0, 2.0)]
    runs[1]["decode"].pop("4096")  # only what every round measured
    merged = tool.median_over_rounds(runs)
    assert merged["prefill"][128]["tokens_per_s"] == 2.0 and merged["decode"][1024]["rounds"] == [30.0, 10.0, 20.0]
    assert set(merged["decode"]) == {1024}


def test_missing_llama_cpp_tree_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="llama-bench binary"):
        _tool().main([str(tmp_path), str(tmp_path), "--llama-cpp", str(tmp_path / "nowhere")])


@pytest.mark.skipif(not os.environ.get("DSV3_LLAMA_CPP"),
                    reason="needs a llama.cpp tree with build/bin/llama-bench (set DSV3_LLAMA_CPP)")
def test_against_llama_cpp_on_tiny(tmp_path):
    from click.testing import CliRunner

    from dsv3_export.cli.main import main as cli

    ckpt, build = tmp_path / "ckpt", tmp_path / "build"
    for args in (["make-checkpoint", "--preset", "tiny", "-o", str(ckpt)], ["build", str(ckpt), "-o", str(build)]):
        assert CliRunner().invoke(cli, args).exit_code == 0
    report = _tool().main([str(ckpt), str(build), "--llama-cpp", os.environ["DSV3_LLAMA_CPP"], "--prefill", "16",
                           "--contexts", "16", "--repeats", "1", "--rounds", "1", "--decode-tokens", "4"])
    assert {(r["phase"], r["tokens"]) for r in report["rows"]} == {("prefill", 16), ("decode", 16)}
    assert all(r["ours"] > 0 and r["llama_cpp"] > 0 for r in report["rows"])


def test_batched_bench_lines_are_parsed():
    tool = load_tool("llamacpp_compare")
    text = "\n".join([
        "main: n_kv_max = 16896",
        '{"n_kv_max": 16896, "n_batch": 2048, "n_ubatch": 512, "flash_attn": 0, "is_pp_shared": 0, "n_gpu_layers": 0, '
        '"n_threads": 2, "n_threads_batch": 2, "pp": 1024, "tg": 16, "pl": 1, "n_kv": 1040, "t_pp": 2.0, '
        '"speed_pp": 512.0, "t_tg": 0.32, "speed_tg": 50.0, "t": 2.32, "speed": 448.2}',
        '{"pp": 1024, "tg": 16, "pl": 4, "n_kv": 4160, "t_pp": 8.0, "speed_pp": 512.0, "t_tg": 0.9, '
        '"speed_tg": 71.1, "t": 8.9, "speed": 467.4}'])
    assert tool.parse_batched(text) == {1: 50.0, 4: 71.1}


def test_every_precision_has_its_llama_cpp_pairs():
    tool = _tool()
    assert tool.PAIRS["fp32"] == ("f32",) and tool.PAIRS["int8"] == tool.PAIRS["int8-wo"] == ("q8_0",)
    assert tool.PAIRS["int4-wo"] == ("q4_0", "q4_K") and tool.PAIRS["fp8"] == ()  # llama.cpp has no FP8 type


def test_markdown_table_has_a_row_per_pair_and_measurement():
    rows = [{"precision": "int4-wo", "gguf_type": kind, "phase": "decode", "tokens": 1024, "ours": 84.2,
             "llama_cpp": theirs, "ratio": 84.2 / theirs} for kind, theirs in (("q4_0", 103.9), ("q4_K", 90.0))]
    text = _tool().markdown(rows, threads=2, rounds=3)
    assert "| int4-wo | Q4_0 | decode @ 1024 | 84.2 | 103.9 | 0.81× |" in text
    assert "| int4-wo | Q4_K | decode @ 1024 | 84.2 | 90.0 | 0.94× |" in text and "medians over 3" in text


def test_a_missing_llama_quantize_is_a_one_line_error(tmp_path):
    from rich.console import Console

    (tmp_path / "x.f32.gguf").write_bytes(b"")
    with pytest.raises(SystemExit, match="llama-quantize"):
        _tool().quantized(tmp_path, tmp_path / "x.f32.gguf", "q8_0", Console(stderr=True))
