"""The chat template: how /v1/chat/completions turns messages into one prompt for a base
model. A Jinja2 template (sandboxed) sees `messages` (each with `role` and `content`
text) and `add_generation_prompt`. The built-in one is plain dialogue:

    <system text>\\n\\n          (system/developer messages, if any)
    User: <text>\\n
    Assistant: <text>\\n
    ...
    Assistant:                 (the model continues here)

and stops generation at "\\nUser:" so the model does not write the user's next turn.
Settings.chat_template names a file to use instead (no implicit stop strings then)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

DEFAULT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role in ('system', 'developer') -%}{{ m.content ~ '\\n\\n' }}"
    "{%- elif m.role == 'user' -%}{{ 'User: ' ~ m.content ~ '\\n' }}"
    "{%- elif m.role == 'assistant' -%}{{ 'Assistant: ' ~ m.content ~ '\\n' }}"
    "{%- else -%}{{ m.role | capitalize ~ ': ' ~ m.content ~ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)
DEFAULT_STOP = ("\nUser:",)


class ChatTemplateError(ValueError):
    pass


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    stop: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path | None) -> ChatTemplate:
        if path is None:
            return cls(DEFAULT_TEMPLATE, DEFAULT_STOP)
        return cls(Path(path).read_text(encoding="utf-8"))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
        try:
            return env.from_string(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"messages: the chat template failed: {exc}") from None
