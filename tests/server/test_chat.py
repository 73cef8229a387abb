"""Chat templates rendered as transformers renders them (server/chat.py), the demo's DeepSeek-style
template, and stop strings over streamed text (server/generation.py)."""

from __future__ import annotations

import json

import pytest

from dsv3_export.exporter.source import demo_path
from dsv3_export.server.chat import ChatTemplate, TemplateError
from dsv3_export.server.loadgen import percentile

# Data: the `chat_template` of deepseek-ai/DeepSeek-V3's tokenizer_config.json (the current revision,
# with tool calls and outputs; its generation prompt is '<｜Assistant｜>'), copied as text.
DEEPSEEK_V3_TEMPLATE = (
    r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"""
)
V3_SPECIALS = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
CHAT = [{"role": "system", "content": "You are helpful."}, {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"}]
TOOLS = [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
         {"role": "tool", "content": "18C, sunny"}]


def test_deepseek_v3_template_renders():
    t = ChatTemplate(DEEPSEEK_V3_TEMPLATE, V3_SPECIALS)
    assert t.render(CHAT) == ("<｜begin▁of▁sentence｜>You are helpful.\n\nBe brief.<｜User｜>Hi<｜Assistant｜>Hello!"
                              "<｜end▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>")
    assert t.render(CHAT[2:3], add_generation_prompt=False) == "<｜begin▁of▁sentence｜><｜User｜>Hi"
    tools = t.render(TOOLS)
    assert tools == ("<｜begin▁of▁sentence｜><｜User｜>Weather in Paris?<｜Assistant｜><｜tool▁calls▁begin｜>"
                     "<｜tool▁call▁begin｜>function<｜tool▁sep｜>weather\n```json\n{\"city\": \"Paris\"}\n```"
                     "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜>"
                     "<｜tool▁output▁begin｜>18C, sunny<｜tool▁output▁end｜><｜tool▁outputs▁end｜>")


def test_rendering_matches_transformers():
    """Same text as transformers' apply_chat_template for DeepSeek-V3's template and the demo's."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(demo_path() / "tokenizer.json")),
                                               bos_token=V3_SPECIALS["bos_token"], eos_token=V3_SPECIALS["eos_token"])
    ours = ChatTemplate(DEEPSEEK_V3_TEMPLATE, V3_SPECIALS)
    # (transformers 5 drops a None content, so the tool call is compared with content "")
    tools = [TOOLS[0], {**TOOLS[1], "content": ""}, TOOLS[2]]
    for messages in (CHAT, tools):
        theirs = tok.apply_chat_template(messages, chat_template=DEEPSEEK_V3_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
        assert ours.render(messages) == theirs
    config = json.loads((demo_path() / "tokenizer_config.json").read_text())
    tok.bos_token, tok.eos_token = config["bos_token"], config["eos_token"]
    theirs = tok.apply_chat_template(CHAT, chat_template=config["chat_template"], tokenize=False,
                                     add_generation_prompt=True)
    assert ChatTemplate.from_build(demo_path()).render(CHAT) == theirs


def test_demo_template_is_deepseek_style():
    t = ChatTemplate.from_build(demo_path())
    bos, eos = "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>"  # the demo tokenizer's specials
    assert t.special_tokens["bos_token"] == bos and t.special_tokens["eos_token"] == eos
    assert t.render(CHAT) == f"{bos}You are helpful.\n\nBe brief.<｜User｜>Hi<｜Assistant｜>Hello!{eos}<｜User｜>2+2?<｜Assistant｜>"
    with pytest.raises(TemplateError, match="tool"):
        t.render([{"role": "tool", "content": "18C"}])  # raise_exception from the template


def test_build_without_template(tmp_path):
    assert ChatTemplate.from_build(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}}))
    assert ChatTemplate.from_build(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>"}, "chat_template": [{"name": "default", "template": "{{ bos_token }}x"}]}))
    assert ChatTemplate.from_build(tmp_path).render([]) == "<s>x"


def test_template_is_sandboxed():
    t = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError):
        t.render([{"role": "user", "content": "x"}])


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2
    assert percentile(list(range(101)), 99) == 99
