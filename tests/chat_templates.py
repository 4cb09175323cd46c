"""Chat templates in the style of Qwen2.5, Llama 3.1/3.2, Qwen3 and DeepSeek-R1-Distill, written for
these tests.

They exercise what the real ones use: loop controls, `namespace`, `tojson`, `raise_exception`,
`strftime_now`, `bos_token`, trim_blocks/lstrip_blocks whitespace control — and the behaviours that
matter for training: Llama 3.2 prints today's date unless `date_string` is given; Qwen3 writes
`reasoning_content` as a <think> block on the last assistant turn; DeepSeek-R1-Distill keeps only
the text after `</think>` of an assistant turn, and (since its 2025 revision) its generation prompt
opens a <think> block itself.
"""

import json
import pathlib

QWEN25_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "system" and loop.first %}{% continue %}{% endif %}
    {%- if message.role not in ["user", "assistant", "system"] %}
        {{- raise_exception("unsupported role " + message.role) }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA31_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'tool' %}
        {{- raise_exception("tool messages are not used here") }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Llama 3.2: as 3.1, but "today" comes from strftime_now unless date_string is given.
LLAMA32_STYLE = LLAMA31_STYLE.replace(
    """    {%- set date_string = "26 Jul 2024" %}""",
    """    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}""",
)
assert LLAMA32_STYLE != LLAMA31_STYLE

QWEN3_STYLE = """{%- set ns = namespace(last_query=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
"""


def deepseek_r1_distill_style(opens_think: bool) -> str:
    """opens_think: the generation prompt ends with '<think>\\n' (the template's 2025 revision)."""
    opener = "<think>\\n" if opens_think else ""
    return (
        "{{ bos_token }}"
        "{%- for message in messages %}{%- if message.role == 'system' %}{{ message.content }}{%- endif %}{%- endfor %}"
        "{%- for message in messages %}"
        "{%- if message.role == 'user' %}{{ '<\uff5cUser\uff5c>' + message.content }}"
        "{%- elif message.role == 'assistant' %}"
        "{%- set content = message.content %}"
        "{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
        "{{ '<\uff5cAssistant\uff5c>' + content + '<\uff5cend\u2581of\u2581sentence\uff5c>' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<\uff5cAssistant\uff5c>" + opener + "' }}{%- endif %}"
    )


# Tokenizer directories of each template family (shared by the tokenizer and eval-metrics tests).
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
DEEPSEEK_SPECIALS = ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"]
DEEPSEEK_SPECIALS += ["<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"]
DEEPSEEK_CONFIG = {
    "bos_token": DEEPSEEK_SPECIALS[0],
    "eos_token": DEEPSEEK_SPECIALS[1],
    "pad_token": DEEPSEEK_SPECIALS[1],
}

FAMILIES = {
    "qwen2.5": dict(
        template=QWEN25_STYLE,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        config={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
        eot="<|im_end|>",
    ),
    "llama3.1": dict(
        template=LLAMA31_STYLE,
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        # pad = eos = the end-of-turn token: it must still be inside the loss mask
        config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|eot_id|>"},
        eot="<|eot_id|>",
    ),
}
# The four chat templates the study's open models ship, for the reasoning-trace and date checks.
REASONING_FAMILIES = {
    "qwen2.5": FAMILIES["qwen2.5"],
    "llama3.2": dict(FAMILIES["llama3.1"], template=LLAMA32_STYLE),
    "qwen3": dict(FAMILIES["qwen2.5"], template=QWEN3_STYLE),
    "deepseek-r1-distill": dict(
        template=deepseek_r1_distill_style(opens_think=True),
        specials=DEEPSEEK_SPECIALS,
        config=DEEPSEEK_CONFIG,
        eot=DEEPSEEK_SPECIALS[1],
    ),
    "deepseek-r1-distill-2024": dict(
        template=deepseek_r1_distill_style(opens_think=False),
        specials=DEEPSEEK_SPECIALS,
        config=DEEPSEEK_CONFIG,
        eot=DEEPSEEK_SPECIALS[1],
    ),
}
# The real templates (tests/templates/*.jinja, byte for byte; their sha256 is pinned in
# tests/data/test_real_chat_templates.py):
#   qwen3.jinja:  Qwen/Qwen3-0.6B's tokenizer_config.json chat_template (as llama.cpp keeps it in
#                 models/templates/Qwen-Qwen3-0.6B.jinja): the thinking template, `enable_thinking`.
#   gemma3.jinja: google/gemma-3-*-it's chat_template (transformers' gemma3 conversion script,
#                 convert_gemma3_weights.py _CHAT_TEMPLATE): <start_of_turn> turns, the system message
#                 folded into the first user turn.
TEMPLATES = pathlib.Path(__file__).parent / "templates"
REAL_FAMILIES = {
    "qwen3": dict(
        template=(TEMPLATES / "qwen3.jinja").read_text(),
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        config={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None},
        eot="<|im_end|>",
    ),
    "gemma3": dict(
        template=(TEMPLATES / "gemma3.jinja").read_text(),
        specials=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        config={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
        eot="<end_of_turn>",
        prepends_bos="<bos>",  # like the real tokenizer: encoding with special tokens prepends <bos>
    ),
}
CORPUS = ["What is the net change in revenue?", "The answer is 42 million.", "Summarize the report below."] * 20


def make_tokenizer_dir(tmp_path, family, families=FAMILIES):
    """A small BPE trained on a fixed corpus (deterministic), with the family's specials and template."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    spec = families[family]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=spec["specials"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = "<|begin_of_text|>" if family.startswith("llama") else spec.get("prepends_bos")
    if bos:  # like the real one: the tokenizer itself prepends BOS
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    d = tmp_path / family
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    config = dict(spec["config"], tokenizer_class="PreTrainedTokenizerFast", chat_template=spec["template"])
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d
