"""Bad flags and prompts through the CLI: one line naming the flag or input, non-zero exit, no traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dsv3_export import engines
from dsv3_export.cli.main import main
from dsv3_export.core.errors import ExportError


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("args, needle", [
    (["run", "{build}", "--ids", "0,99999999999999999999999"], "--ids"),
    (["run", "{build}", "--ids", "0,1", "--seed", "-1"], "--seed"),
    (["run", "{build}", "--ids", "0,1", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench", "{build}", "--repeats", "0"], "--repeats"),
    (["bench", "{build}", "--threads", "0"], "--threads"),
    (["make-checkpoint", "--preset", "tiny", "-o", "{tmp}/c", "--layout", "deepseek", "--mp", "0"], "--mp"),
    (["make-checkpoint", "--preset", "tiny", "-o", "{tmp}/c", "--layout", "deepseek", "--mp", "-2"], "--mp"),
])
def test_bad_flags_are_one_line(tiny_build, tmp_path, args, needle):
    r = _run(*[a.format(build=tiny_build, tmp=tmp_path) for a in args])
    lines = r.output.strip().splitlines()
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output
    assert not (tmp_path / "c").exists()


def test_a_prompt_that_is_not_utf8(tiny_build):
    engine = engines.load(tiny_build)
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of a Latin-1 argv
    with pytest.raises(ExportError, match="not valid UTF-8"):
        engine.generate(bad, max_new_tokens=2)
    r = _run("run", tiny_build, "--prompt", bad)
    assert r.exit_code == 1 and "not valid UTF-8" in r.output and "Traceback" not in r.output
