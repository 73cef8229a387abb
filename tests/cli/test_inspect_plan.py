"""`dsv3-export inspect SOURCE --plan NxDEVICE`: the plan's table, its JSON, and its clear failures."""

import json
import re

from click.testing import CliRunner

from dsv3_export.cli.main import main
from dsv3_export.core.config import preset, to_hf_dict
from dsv3_export.exporter.deploy_plan import DEVICES
from dsv3_export.exporter.stage_plan import weight_bytes
from tests.helpers import assert_clean_error


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_v3_on_8xh200_fp8_prints_eight_stages():
    r = run("inspect", "v3", "--plan", "8xH200", "--precision", "fp8")
    assert r.exit_code == 0, r.output
    assert "fits" in r.output and "does not fit" not in r.output
    stage_rows = [line for line in r.output.splitlines() if re.match(r"^│ [0-9] ", line)]
    assert [int(line.split("│")[1]) for line in stage_rows] == list(range(8))
    assert "0-9 + embed" in stage_rows[0] and "head, MTP" in stage_rows[-1]
    assert "│ all " in r.output and "per sequence at batch 32" in r.output
    assert r.output.rstrip().endswith("┘")  # the table ends the output


def test_plan_json_sums_to_the_model():
    r = run("inspect", "v3", "--plan", "8xH200", "--precision", "fp8", "--batch", "16", "--context", "65536", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    w = weight_bytes(preset("v3"), "fp8")
    assert sum(s["weight_bytes"] for s in plan["stages"]) == w["embed"] + sum(w["layers"]) + w["head"] + w["mtp"]
    assert plan["device"] == {"count": 8, "name": "H200", "memory_bytes": DEVICES["H200"]}
    assert plan["batch"] == 16 and plan["context"] == 65536 and plan["fits"]
    assert all(s["used_bytes"] <= DEVICES["H200"] for s in plan["stages"])


def test_plan_that_does_not_fit_exits_1():
    r = run("inspect", "v3", "--plan", "1xH200", "--precision", "fp8")
    assert r.exit_code == 1 and "does not fit: stage 0 is short by" in r.output
    assert "Traceback" not in r.output


def test_bad_plan_is_one_line():
    assert_clean_error(run("inspect", "v3", "--plan", "8xH300"), "--plan", "'8xH300'", "H200", "80GB")
    assert_clean_error(run("inspect", "v3", "--plan", "99xH200"), "--plan", "61 layers")
    assert_clean_error(run("inspect", "v3", "--plan", "8xH200", "--precision", "fp9"), "--precision")


def test_plan_options_need_plan():
    r = run("inspect", "v3", "--batch", "8")
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == ["error: --batch: only with --plan (e.g. --plan 8xH200)"]


def test_plan_from_a_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(preset("v3"))))
    r = run("inspect", tmp_path, "--plan", "8xH200", "--precision", "fp8", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["totals"] == json.loads(run("inspect", "v3", "--plan", "8xH200", "--precision", "fp8",
                                                            "--json").output)["totals"]
