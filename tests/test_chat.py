"""Chat templates (trimode/chat.py): rendered as transformers' apply_chat_template renders them
(its tokenizer is the oracle), found where transformers looks, refused clearly when missing or
broken; `trimode generate --chat` applies the same one."""

from __future__ import annotations

import json
import shutil

import pytest

from trimode.chat import DEFAULT_CHAT_TEMPLATE, NoChatTemplateError, check_messages, load_chat_template
from trimode.cli import EMBEDDED_CHECKPOINT, main
from trimode.errors import CheckpointError, InputError

CHATS = [
    [{"role": "user", "content": "add two numbers"}],
    [
        {"role": "system", "content": "be brief\nand clear"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "def hi():\n    pass"},
        {"role": "user", "content": "again, in ünïcode"},
    ],
]
# Hub-style templates: BOS in the text, loop controls, raise_exception, tojson, namespace, trimmed blocks
TEMPLATES = {
    "embedded": DEFAULT_CHAT_TEMPLATE,
    "llama-like": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('bad role') }}{% endif %}\n"
        "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}\n"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "json": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 3 %}{% break %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}\n{% endfor %}{{ ns.n }}"
    ),
}


def checkpoint_with(tmp_path, template) -> object:
    out = tmp_path / "ck"
    shutil.copytree(EMBEDDED_CHECKPOINT, out, ignore=shutil.ignore_patterns("*.safetensors", "linear_spec_lora"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("messages", CHATS, ids=["one", "four"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers_does(tmp_path, name, messages, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast

    ck = checkpoint_with(tmp_path, TEMPLATES[name])
    oracle = PreTrainedTokenizerFast.from_pretrained(str(ck))
    want = oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = load_chat_template(ck).render(messages, add_generation_prompt)
    # our engine's tokenizer adds BOS itself, so a template's leading BOS is left out of the text
    assert got == want.removeprefix("<s>")
    assert want.startswith("<s>") == (name == "llama-like")


def test_embedded_checkpoint_has_the_default_template():
    template = load_chat_template(EMBEDDED_CHECKPOINT)
    assert template.render(CHATS[0]) == '"""add two numbers"""\n\n'
    assert template.special_tokens["bos_token"] == "<s>" and template.special_tokens["eos_token"] == "</s>"


def test_template_file_wins(tmp_path):
    ck = checkpoint_with(tmp_path, "from config")
    (ck / "chat_template.jinja").write_text("from jinja file")
    assert load_chat_template(ck).render(CHATS[0]) == "from jinja file"
    (tmp_path / "mine.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert load_chat_template(ck, tmp_path / "mine.jinja").render(CHATS[0]) == "ADD TWO NUMBERS"


def test_named_templates_use_default(tmp_path):
    ck = checkpoint_with(tmp_path, [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "d"}])
    assert load_chat_template(ck).render(CHATS[0]) == "d"


@pytest.mark.parametrize(
    "template, error, message",
    [
        (None, NoChatTemplateError, "the checkpoint has no chat template"),
        ("", NoChatTemplateError, "the checkpoint has no chat template"),
        ([{"name": "tool_use", "template": "x"}], NoChatTemplateError, "no chat template"),
        (7, CheckpointError, "chat_template must be a string"),
        ("{% for m in messages %}", CheckpointError, "not a valid Jinja template"),
    ],
)
def test_missing_or_broken_templates(tmp_path, template, error, message):
    with pytest.raises(error) as e:
        load_chat_template(checkpoint_with(tmp_path, template))
    assert message in str(e.value)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "expected a non-empty list"),
        ("hi", "expected a non-empty list"),
        ([{"content": "hi"}], "messages[0]: expected an object with a string role"),
        ([{"role": "user", "content": None}], "messages[0].content: expected a string"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
    ],
)
def test_bad_messages(messages, message):
    with pytest.raises(InputError) as e:
        check_messages(messages)
    assert message in str(e.value)


def test_text_parts_are_joined():
    parts = [{"type": "text", "text": "add "}, {"type": "text", "text": "two"}]
    assert check_messages([{"role": "user", "content": parts}])[0]["content"] == "add two"


def test_template_errors_are_input_errors(tmp_path):
    template = load_chat_template(checkpoint_with(tmp_path, TEMPLATES["llama-like"]))
    with pytest.raises(InputError, match="the chat template refused them.*bad role"):
        template.render([{"role": "tool", "content": "x"}])
    with pytest.raises(InputError, match="an empty prompt"):
        load_chat_template(checkpoint_with(tmp_path / "2", "{{ '' }}")).render(CHATS[0])


def test_generate_chat_is_generate_of_the_rendered_prompt(runner):
    args = ["generate", "--max-new-tokens", "6", "--json"]
    chat = runner.invoke(main, [*args, "--chat", "add two numbers"])
    plain = runner.invoke(main, [*args, '"""add two numbers"""\n\n'])
    assert chat.exit_code == 0 and plain.exit_code == 0, chat.output + plain.output
    assert json.loads(chat.stdout)["results"][0]["tokens"] == json.loads(plain.stdout)["results"][0]["tokens"]
    shown = runner.invoke(main, ["generate", "--max-new-tokens", "6", "--chat", "add two numbers"])
    assert shown.stdout.rstrip("\n") == json.loads(chat.stdout)["results"][0]["text"]  # the reply alone


@pytest.mark.parametrize(
    "args, message, exit_code",
    [
        (["--chat", "--checkpoint", "{tiny}", "hi"], "the checkpoint has no chat template", 1),
        (["--chat", "--chat-template", "{missing}", "hi"], "missing.jinja: cannot read the chat template", 1),
        (["--chat-template", "{missing}", "hi"], "--chat-template needs --chat", 2),
        (["--chat", "--url", "127.0.0.1:1", "hi"], "--url and --chat", 2),
    ],
)
def test_generate_chat_refusals(refused, tiny_dir, tmp_path, args, message, exit_code):
    args = [a.format(tiny=tiny_dir, missing=tmp_path / "missing.jinja") for a in args]
    refused(["generate", *args], tmp_path, message, exit_code)
