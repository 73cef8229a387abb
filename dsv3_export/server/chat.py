"""Chat templates: a build's `tokenizer_config.json` `chat_template`, rendered the way transformers'
`apply_chat_template` renders it (jinja2's immutable sandbox, trim_blocks and lstrip_blocks, the
`raise_exception` and `strftime_now` globals, a `tojson` that keeps non-ASCII text, `bos_token` /
`eos_token` and any other special token of the config as variables, add_generation_prompt=True)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsv3_export.core.build_dir import TOKENIZER_CONFIG
from dsv3_export.core.errors import ExportError


class TemplateError(ExportError):
    """The template refused the messages (its `raise_exception`) or failed to render them."""


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """One compiled chat template and the special tokens it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        def raise_exception(message):
            raise TemplateError(str(message))

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ExportError(f"the chat template does not compile: {e}") from None
        self.source = source
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_build(cls, build_dir: str | Path) -> ChatTemplate | None:
        """The build's template, or None when its tokenizer_config.json is missing or has none."""
        path = Path(build_dir) / TOKENIZER_CONFIG
        if not path.is_file():
            return None
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"{path}: not a JSON file ({e})") from None
        source = config.get("chat_template")
        if isinstance(source, list):  # the named-templates form: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        specials = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                    if (t := _token_text(config.get(k))) is not None}
        return cls(source, specials)

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra) -> str:
        variables = {"bos_token": "", "eos_token": "", **self.special_tokens, **extra}
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, KeyError, ValueError, AttributeError) as e:
            raise TemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
