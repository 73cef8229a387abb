"""`dsv3-export run --chat`: an interactive chat through a build's chat template."""

from __future__ import annotations

import sys

import click

from dsv3_export.core.errors import ExportError
from dsv3_export.engines.text import TextOutput
from dsv3_export.server.chat import ChatTemplate

CHAT_TURNS = 10_000  # a bound on one chat session's turns


def chat_session(engine, params, stop_strings, system: str | None, speculative: bool) -> None:
    """`run --chat`: each line of input a user turn; the whole history rendered by the build's chat
    template (special tokens written by the template: no BOS added), the reply streamed."""
    template = ChatTemplate.from_build(engine.build_dir)
    if template is None or engine.tokenizer is None:
        raise ExportError(f"{engine.build_dir}: no chat template (tokenizer_config.json with chat_template) "
                          "and tokenizer.json: use --prompt")
    messages = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    for _ in range(CHAT_TURNS):
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("", "/exit"):
            return
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = engine.tokenize(template.render(messages, add_generation_prompt=True), add_bos=False)
        out = TextOutput(engine.tokenizer, stop_strings=stop_strings, stop_ids=params.stop)

        def on_token(row: int, token: int) -> None:
            click.echo(out.push(token), nl=False)
            sys.stdout.flush()

        result = engine.generate(ids, params, stop_strings=stop_strings, speculative=speculative, on_token=on_token)
        click.echo(out.finish())
        click.echo(result.stats.summary(), err=True)
        messages.append({"role": "assistant", "content": result.text})
