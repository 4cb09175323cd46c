"""The real chat templates of Qwen3 and Gemma 3 through data/sft.py: ids equal transformers'
apply_chat_template, and the loss mask covers the reply (and its end-of-turn) only."""

import hashlib

import numpy as np
import pytest

from data.sft import SFTOptions, tokenize_example
from data.tokenizer import Tokenizer
from tests.chat_templates import REAL_FAMILIES, TEMPLATES, make_tokenizer_dir
from tests.data.test_tokenizer_sft import RECORD

# sha256 of tests/templates/<family>.jinja: a template edited by accident fails here, not silently.
SHA256 = {
    "qwen3": "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",
    "gemma3": "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4",
}
CASES = {  # (family, enable_thinking): what the template writes between the prompt and the answer
    ("qwen3", None): "<think>\n\n</think>\n\n",  # thinking mode: the reply opens with an (empty) think block
    ("qwen3", False): "",  # non-thinking: the empty block is already in the generation prompt
    ("qwen3", True): "<think>\n\n</think>\n\n",
    ("gemma3", None): "",
}


def test_the_templates_are_the_pinned_ones():
    for family, digest in SHA256.items():
        assert hashlib.sha256((TEMPLATES / f"{family}.jinja").read_bytes()).hexdigest() == digest, family


@pytest.mark.parametrize("family, thinking", list(CASES))
def test_real_templates_tokenize_as_transformers_and_mask_only_the_reply(tmp_path, family, thinking):
    import transformers

    d = make_tokenizer_dir(tmp_path, family, REAL_FAMILIES)
    ours = Tokenizer(str(d), enable_thinking=thinking)
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    extra = {} if thinking is None else {"enable_thinking": thinking}
    conversations = [
        ([{"role": "user", "content": "What is the net change?"}], True),
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Summarize."},
                {"role": "assistant", "content": "The answer is 42."},
            ],
            False,
        ),
    ]
    for messages, gen in conversations:
        expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, **extra)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ours.encode(ours.render(messages, gen)) == list(expected)
    assert ours.end_of_turn == REAL_FAMILIES[family]["eot"]
    if family == "gemma3":  # no system role: the system message opens the first user turn
        text = ours.render(conversations[1][0], False)
        assert "<start_of_turn>user\nBe brief.\n\nSummarize.<end_of_turn>" in text and "system" not in text

    ex = tokenize_example(ours, RECORD, SFTOptions(max_seq_len=512, model_vocab_size=ours.vocab_size))
    ids = list(ex["tokens"])
    if family == "gemma3":
        assert ids.count(ours.token_id("<bos>")) == 1  # the template's bos_token only, not a second one
    start = int(np.argmax(ex["loss_mask"])) + 1  # the first target position's input is the prompt's end
    user = {"role": "user", "content": f"{RECORD['instruction']}\n\n{RECORD['document']}"}
    prompt = theirs.apply_chat_template([user], tokenize=True, add_generation_prompt=True, **extra)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert ids[:start] == list(prompt)  # the loss starts right after the generation prompt
    reply = CASES[(family, thinking)] + RECORD["target"] + ours.end_of_turn
    assert ours.decode(ex["targets"][ex["loss_mask"] == 1]) == reply
    assert ids[-1] == ours.end_of_turn_id


def test_the_non_thinking_prompt_cannot_carry_a_trace():
    from configs import base
    from lora_jax.errors import ConfigError
    from lora_jax.run.config import validate

    config = base.arm_config("medreason", "oproj", "runlocal")
    config.data.enable_thinking = False
    config.data.reasoning_traces = True
    with pytest.raises(ConfigError, match="data.enable_thinking=False with data.reasoning_traces=True"):
        validate(config)
