"""Chat templates rendered the way transformers renders them (sandboxed jinja2).

Rendering is a pure function of the messages: templates that write today's date into the prompt
(Llama 3.x: `strftime_now("%d %b %Y")` unless `date_string` is given) see a pinned date instead
(`data.render_date`), so a record renders to the same ids on every day and a resumed run sees the
batches it would have seen.
"""

from __future__ import annotations

import functools
import json
from datetime import date

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Declared fallback for base checkpoints that ship no template: ChatML-style turns.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers: no HTML escaping, with indent/separators options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


DEFAULT_RENDER_DATE = "2024-07-26"  # the date Llama 3.1's template falls back to ("26 Jul 2024")


def parse_render_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except (TypeError, ValueError):
        raise ValueError(f"data.render_date={text!r} is not a date in the form YYYY-MM-DD") from None


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def render_chat(
    source: str,
    messages: list[dict],
    add_generation_prompt: bool,
    special_tokens: dict,
    render_date: str = DEFAULT_RENDER_DATE,
    enable_thinking: bool | None = None,
) -> str:
    """Renders messages ([{role, content, (reasoning_content)}]) to the prompt text, "today" being
    render_date. enable_thinking is passed to the template (Qwen3's switch) unless None, as
    `apply_chat_template(..., enable_thinking=...)` does: None leaves it undefined."""
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    today = parse_render_date(render_date)
    return compile_template(source).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        tools=None,
        documents=None,
        strftime_now=today.strftime,  # never the wall clock
        date_string=today.strftime("%d %b %Y"),  # what transformers users pass to pin Llama 3.x's date
        **special_tokens,
        **extra,
    )
