"""A checkpoint's chat template (Jinja, in tokenizer_config.json or chat_template.jinja), rendered
the way transformers' `apply_chat_template` renders it: a sandboxed environment with trim_blocks
and lstrip_blocks, `messages`, `add_generation_prompt`, the special tokens as strings, and the
helpers templates from the Hub call (raise_exception, strftime_now, a tojson that keeps non-ASCII).
The one place chat text is made: `trimode generate --chat` and the OpenAI front end both call it."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from trimode.errors import CheckpointError, InputError

# The embedded checkpoint's template. It was trained on Python source only: a message is a docstring,
# a reply is code (the model writes code after a docstring and a blank line, and little else).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + '\\n' }}"
    "{% else %}{{ '\"\"\"' + message['content'] + '\"\"\"\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}{% endif %}"
)
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "sep_token", "cls_token")


class NoChatTemplateError(InputError):
    """The checkpoint has no chat template: chat requests cannot be turned into a prompt."""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str], origin: str = "chat_template"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"{origin}: not a valid Jinja template ({e})") from None
        self.special_tokens, self.origin = special_tokens, origin

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """-> the prompt text. A leading BOS is left out: the tokenizer adds its own (tokenizer.encode)."""
        import jinja2

        messages = check_messages(messages)
        try:
            text = self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.TemplateError as e:
            raise InputError(f"messages: the chat template refused them ({e})") from None
        bos = self.special_tokens.get("bos_token")
        if bos and text.startswith(bos):
            text = text[len(bos) :]
        if not text:
            raise InputError("messages: the chat template made an empty prompt")
        return text


def load_chat_template(checkpoint_dir: Path, template_path: Path | None = None) -> ChatTemplate:
    """The checkpoint's template: template_path (a Jinja file) when given, else chat_template.jinja
    (where transformers >= 4.43 saves it), else tokenizer_config.json's chat_template (a string, or a
    list of named ones: "default"). The special tokens are always the checkpoint's."""
    checkpoint_dir = Path(checkpoint_dir)
    config_path = checkpoint_dir / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: cannot read it ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    special = {name: token for name in _SPECIAL if (token := _token(config.get(name)))}
    path = Path(template_path) if template_path is not None else checkpoint_dir / "chat_template.jinja"
    if template_path is not None or path.is_file():
        try:
            return ChatTemplate(path.read_text(), special, str(path))
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: cannot read the chat template ({getattr(e, 'strerror', None) or e})") from None
    source = config.get("chat_template")
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not source:
        raise NoChatTemplateError(
            f"{checkpoint_dir}: the checkpoint has no chat template (no chat_template in "
            f"tokenizer_config.json); send a plain prompt instead"
        )
    if not isinstance(source, str):
        raise CheckpointError(f"{config_path}: chat_template must be a string")
    return ChatTemplate(source, special, f"{config_path} chat_template")


def check_messages(messages) -> list[dict]:
    """OpenAI chat messages -> plain dicts with a role and string content (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages: expected a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InputError(f"messages[{i}]: expected an object with a string role")
        content = message.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise InputError(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content: expected a string or a list of text parts")
        out.append({**message, "content": content})
    return out


def _token(value) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken's {content: ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    import jinja2

    raise jinja2.TemplateError(message)
