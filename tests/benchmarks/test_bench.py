"""bench: the figures it reports and their shape (no timing is asserted: speed goes to docs/)."""

import json

import pytest
from click.testing import CliRunner

from dsv3_export.benchmarks.bench import bench, merge_rounds
from dsv3_export.cli.main import main


def test_bench_reports_engine_and_reference(tiny_build):
    report = bench([tiny_build], threads=1, repeats=2, prefill=(8, 16), contexts=(8, 32), decode_steps=2,
                   bandwidth_megabytes=16)
    engine, ref = report["results"]
    assert engine["kind"] == "engine" and ref["kind"] == "reference"
    for r in (engine, ref):
        assert set(r["prefill"]) == {"8", "16"} and set(r["decode"]) == {"8", "32"}
        for f in list(r["prefill"].values()) + list(r["decode"].values()):
            assert f["min"] <= f["tokens_per_s"] <= f["max"] and f["repeats"] == 2
        assert r["peak_rss_bytes"] > 0
    # latent cache bytes: layers x context x (kv_lora_rank + rope) x fp32
    assert engine["decode"]["32"]["cache_bytes"] == 3 * 32 * 40 * 4
    assert engine["engine_bytes"] > 0 and engine["precision"] == "fp32"
    ratios = report["ratios"]["vs_reference"][str(tiny_build)]
    assert set(ratios["decode"]) == {"8", "32"}
    # The memory bound: the weights a token reads plus that context's cache, at the bandwidth measured.
    bandwidth = report["machine"]["read_bandwidth_bytes_per_s"]
    assert bandwidth > 0 and report["machine"]["read_bandwidth_rounds"] == [bandwidth]
    bound = engine["memory_bound"]
    for c in ("8", "32"):
        b = bound["decode"][c]
        assert b["bytes"] == bound["weights"]["weights"] + engine["decode"][c]["cache_bytes"]
        assert b["tokens_per_s"] == pytest.approx(bandwidth / b["bytes"])
        assert b["reached"] == pytest.approx(engine["decode"][c]["tokens_per_s"] / b["tokens_per_s"])
        assert b["vs_reference"] == pytest.approx(b["tokens_per_s"] / ref["decode"][c]["tokens_per_s"])
    assert "memory_bound" not in ref
    # Session start, cold (files evicted from the page cache) and warm: figures, not asserted speeds.
    assert set(engine["session_start"]) == {"cold_seconds", "warm_seconds"} and "session_start" not in ref
    assert all(v > 0 for v in engine["session_start"].values())


def test_bench_cli_json(tiny_build, tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(main, ["bench", str(tiny_build), "--repeats", "1", "--prefill", "8", "--contexts", "8",
                                  "--decode-steps", "1", "--no-reference", "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert len(data["results"]) == 1 and "vs_reference" not in data["ratios"]
    assert "memory bound [" in r.output and "reached" in r.output


def test_bench_refuses_non_build(tmp_path):
    r = CliRunner().invoke(main, ["bench", str(tmp_path)])
    assert r.exit_code == 1 and "manifest.json" in r.output and "Traceback" not in r.output


def test_rounds_alternate_and_report_medians(tiny_build):
    report = bench([tiny_build], threads=1, repeats=1, prefill=(8,), contexts=(8,), decode_steps=2, rounds=3,
                   bandwidth_megabytes=16)
    assert len(report["machine"]["read_bandwidth_rounds"]) == 3
    assert report["params"]["rounds"] == 3
    for r in report["results"]:
        for f in (r["prefill"]["8"], r["decode"]["8"]):
            assert len(f["rounds"]) == 3 and f["repeats"] == 3
            assert f["tokens_per_s"] == sorted(f["rounds"])[1] and f["min"] <= min(f["rounds"])


def test_merge_rounds_takes_medians_and_the_largest_memory():
    def run(tps, rss):
        fig = {"tokens_per_s": tps, "min": tps - 1, "max": tps + 1, "repeats": 2}
        return {"kind": "engine", "load_seconds": 1.0, "prefill": {"8": dict(fig)}, "decode": {"8": dict(fig)},
                "peak_rss_bytes": rss}

    merged = merge_rounds([run(10.0, 5), run(30.0, 7), run(20.0, 6)])
    assert merged["decode"]["8"]["tokens_per_s"] == 20.0 and merged["decode"]["8"]["rounds"] == [10.0, 30.0, 20.0]
    assert merged["decode"]["8"]["min"] == 9.0 and merged["decode"]["8"]["max"] == 31.0
    assert merged["prefill"]["8"]["repeats"] == 6 and merged["peak_rss_bytes"] == 7


def test_bench_refuses_zero_rounds(tiny_build):
    r = CliRunner().invoke(main, ["bench", str(tiny_build), "--rounds", "0"])
    assert r.exit_code != 0 and "--rounds" in r.output and "Traceback" not in r.output


def test_bench_explains_its_dashes(tiny_build):
    """tiny's context is 1024: a context of 1024 + 2 decode steps is skipped, and the table says why."""
    from dsv3_export.cli.tables import bench_notes

    r = CliRunner().invoke(main, ["bench", str(tiny_build), "--repeats", "1", "--prefill", "8", "--contexts",
                                  "8,1024", "--decode-steps", "2", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert "decode 1024: context + 2 steps exceeds the model's context (max_seq_len 1024)" in r.output
    assert "-: reference, on disk: the PyTorch reference has no build" in r.output
    report = bench([tiny_build], threads=1, repeats=1, prefill=(2048,), contexts=(8,), decode_steps=1,
                   reference=False, bandwidth_megabytes=16)
    assert report["results"][0]["skipped"] == {"prefill 2048": "longer than the model's context (max_seq_len 1024)"}
    busy = {**report, "machine": {**report["machine"], "load_average_max": 5.0, "cpus": 2}}
    assert any(n.startswith("warning: the load average reached 5.0 on 2 cores") for n in bench_notes(busy))
    idle = {**report, "machine": {**report["machine"], "load_average_max": 0.5, "cpus": 2}}
    assert not any(n.startswith("warning") for n in bench_notes(idle))
