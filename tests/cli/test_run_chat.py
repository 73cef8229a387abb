"""`run --chat`: each input line a user turn, the history through the build's chat template, the
replies those the engine gives for the rendered conversation."""

from click.testing import CliRunner

from dsv3_export import engines
from dsv3_export.cli.main import main
from dsv3_export.server.chat import ChatTemplate


def _reply(engine, template, messages, max_tokens):
    ids = engine.tokenize(template.render(messages, add_generation_prompt=True), add_bos=False)
    return engine.generate(ids, max_new_tokens=max_tokens).text


def test_chat_keeps_the_history(demo_build):
    r = CliRunner().invoke(main, ["run", str(demo_build), "--chat", "--max-tokens", "12", "--system", "Be brief."],
                           input="def add(a, b):\nand subtract?\n\nnever read\n")
    assert r.exit_code == 0, r.output
    engine = engines.load(demo_build, threads=1)
    template = ChatTemplate.from_build(demo_build)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def add(a, b):"}]
    first = _reply(engine, template, history, 12)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "and subtract?"}]
    second = _reply(engine, template, history, 12)
    assert r.stdout == f"{first}\n{second}\n"  # the empty line ended it: the last line was never read


def test_chat_refuses_a_prompt_and_a_build_without_template(tiny_build):
    r = CliRunner().invoke(main, ["run", str(tiny_build), "--chat", "--prompt", "x"])
    assert r.exit_code == 1 and "--chat reads its turns from the input" in r.output
    r = CliRunner().invoke(main, ["run", str(tiny_build), "--chat"], input="hi\n")
    assert r.exit_code == 1 and "no chat template" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["run", str(tiny_build), "--prompt", "x", "--system", "s"])
    assert r.exit_code == 1 and "--system is for --chat" in r.output
