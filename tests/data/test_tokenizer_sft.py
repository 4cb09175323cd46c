"""Token ids against transformers' apply_chat_template; loss masks; truncation never cuts the target."""

import json

import numpy as np
import pytest

from data import samples
from data.sft import SFTOptions, tokenize_example
from data.tokenizer import Tokenizer
from tests.chat_templates import (
    CORPUS,
    FAMILIES,
    QWEN25_STYLE,
    REASONING_FAMILIES,
    make_tokenizer_dir,
)

RECORD = {
    "id": "x",
    "instruction": "Summarize the report below.",
    "document": "What is the net change in revenue? " * 3,
    "target": "The answer is 42 million.",
    "reasoning": "",
    "answer": "42",
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_ids_equal_transformers_apply_chat_template(tmp_path, family):
    import transformers

    d = make_tokenizer_dir(tmp_path, family)
    ours = Tokenizer(str(d))
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    for messages, gen in [
        ([{"role": "user", "content": "What is the net change?"}], True),
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Summarize."},
                {"role": "assistant", "content": "The answer is 42."},
            ],
            False,
        ),
    ]:
        expected = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert ours.encode(ours.render(messages, gen)) == list(expected)
    assert ours.end_of_turn == FAMILIES[family]["eot"]
    ex = tokenize_example(ours, RECORD, SFTOptions(max_seq_len=512, model_vocab_size=ours.vocab_size))
    ids = list(ex["tokens"])
    if family == "llama3.1":
        assert ids.count(ours.token_id("<|begin_of_text|>")) == 1  # no double BOS
    # the end-of-turn token is the last target and is inside the loss mask (also when pad == eos)
    assert ids[-1] == ours.end_of_turn_id
    last_masked = int(np.nonzero(ex["loss_mask"])[0][-1])
    assert ex["targets"][last_masked] == ours.end_of_turn_id and last_masked == len(ids) - 2
    # the masked targets decode to exactly the answer + end-of-turn
    assert ours.decode(ex["targets"][ex["loss_mask"] == 1]) == RECORD["target"] + ours.end_of_turn


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tokenizer(samples.write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.mark.parametrize("how", ["document_end", "document_middle"])
def test_truncation_cuts_only_the_document(tiny, how):
    record = dict(RECORD, document="".join(f"fact {i}. " for i in range(300)))
    opts = SFTOptions(max_seq_len=300, truncation=how)
    ex = tokenize_example(tiny, record, opts)
    assert len(ex["tokens"]) <= 300
    text = tiny.decode(ex["tokens"])
    assert RECORD["instruction"] in text and tiny.decode(ex["targets"][ex["loss_mask"] == 1]).startswith(
        RECORD["target"]
    )
    assert ("fact 0." in text) and (("fact 299." in text) == (how == "document_middle"))
    # the loss mask covers exactly the target: as many tokens as the target + end-of-turn
    assert ex["loss_mask"].sum() == len(tiny.encode(RECORD["target"])) + 1


def test_examples_that_cannot_fit_are_dropped_not_cut(tiny):
    assert tokenize_example(tiny, dict(RECORD, document=""), SFTOptions(max_seq_len=40)) is None
    assert tokenize_example(tiny, RECORD, SFTOptions(max_seq_len=512, max_target_tokens=5)) is None


def test_vocab_check_and_reasoning_placement(tiny):
    from data.records import DataError

    with pytest.raises(DataError, match="outside the model's vocabulary of 100"):
        tokenize_example(tiny, RECORD, SFTOptions(max_seq_len=512, model_vocab_size=100))
    with_trace = tokenize_example(tiny, dict(RECORD, reasoning="add them"), SFTOptions(512, reasoning_traces=True))
    text = tiny.decode(with_trace["targets"][with_trace["loss_mask"] == 1])
    assert text.startswith("<think>\nadd them\n</think>\n\n") and RECORD["target"] in text
    without = tokenize_example(tiny, dict(RECORD, reasoning="add them"), SFTOptions(512, reasoning_traces=False))
    assert "think" not in tiny.decode(without["tokens"])


def test_fallback_template_for_base_checkpoints(tmp_path):
    d = samples.write_tiny_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer(d)
    assert not tok.has_template and tok.end_of_turn == "<|im_end|>"


def test_sentencepiece_tokenizer_dir(tmp_path):
    """A SentencePiece `tokenizer.model` (Llama 2 / Mistral style) goes through the same path."""
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 5))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=64,
        model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    tok = Tokenizer(str(tmp_path))
    assert tok.end_of_turn == "<|im_end|>"  # the declared ChatML fallback
    ex = tokenize_example(tok, RECORD, SFTOptions(max_seq_len=512, model_vocab_size=64))
    assert tok.decode(ex["targets"][ex["loss_mask"] == 1]).replace(" ", "") == (
        RECORD["target"] + "<|im_end|>"
    ).replace(" ", "")
    # Truncating a non-ASCII document: offsets are characters (SentencePiece reports bytes).
    text = "Der Umsatz stieg um 42 Millionen – während die Kosten fielen. " * 6
    ids, offsets = tok.encode_with_offsets(text)
    assert all(0 <= b <= e <= len(text) for b, e in offsets) and offsets[-1][1] == len(text.rstrip())
    surfaces = [p.surface for p in tok._sp.encode(text, out_type="proto").pieces]
    assert [text[b:e] for b, e in offsets] == surfaces  # each piece's own characters
    record = dict(RECORD, document=text)
    full_len = len(tokenize_example(tok, record, SFTOptions(max_seq_len=4096))["tokens"])
    for how in ("document_end", "document_middle"):
        cut = tokenize_example(tok, record, SFTOptions(max_seq_len=full_len - 25, truncation=how))
        assert cut is not None and len(cut["tokens"]) <= full_len - 25
        assert tok.decode(cut["targets"][cut["loss_mask"] == 1]).replace(" ", "") == (
            RECORD["target"] + "<|im_end|>"
        ).replace(" ", "")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_prompt_is_the_trained_prompt(tmp_path, family):
    """What a model generates from is the prefix of its training example before the loss starts, also
    when the document has to be cut to leave room for the new tokens."""
    from data.sft import generation_prompt_ids

    tok = Tokenizer(str(make_tokenizer_dir(tmp_path, family)))
    ex = tokenize_example(tok, RECORD, SFTOptions(max_seq_len=512))
    start = int(np.argmax(ex["loss_mask"])) + 1
    assert generation_prompt_ids(tok, RECORD, SFTOptions(max_seq_len=512), 16) == list(ex["tokens"][:start])
    short = generation_prompt_ids(tok, RECORD, SFTOptions(max_seq_len=start + 10), 16)
    assert len(short) <= start + 10 - 16 and short[:5] == list(ex["tokens"][:5])


TRACE = "Revenue rose from 100 to 142.\nSo the change is 42 million."


@pytest.mark.parametrize("family", list(REASONING_FAMILIES))
def test_every_trace_token_is_in_the_loss_mask(tmp_path, family):
    """DeepSeek-R1-Distill's template drops what precedes `</think>`: the trace must still be trained."""
    tok = Tokenizer(str(make_tokenizer_dir(tmp_path, family, REASONING_FAMILIES)))
    record = dict(RECORD, reasoning=TRACE)
    ex = tokenize_example(tok, record, SFTOptions(max_seq_len=512, reasoning_traces=True))
    masked = list(ex["targets"][ex["loss_mask"] == 1])
    trace_ids = tok.encode(TRACE)
    assert any(masked[i : i + len(trace_ids)] == trace_ids for i in range(len(masked))), family
    text = tok.decode(masked)
    assert text.index(TRACE) < text.index(RECORD["target"]) and text.endswith(tok.end_of_turn)
    # the model is trained to continue exactly the prompt it is given at generation time
    prompt = tok.encode(
        tok.render([{"role": "user", "content": f"{RECORD['instruction']}\n\n{RECORD['document']}"}], True)
    )
    assert list(ex["tokens"][: len(prompt)]) == prompt
    assert tokenize_example(tok, record, SFTOptions(max_seq_len=512, reasoning_traces=False)) is not None


def test_a_template_that_cannot_carry_traces_is_an_error(tmp_path):
    from data.records import DataError

    d = make_tokenizer_dir(tmp_path, "qwen2.5")
    config = json.loads((d / "tokenizer_config.json").read_text())
    # a template that never writes the assistant's content: no rendering can train the trace
    config["chat_template"] = QWEN25_STYLE.replace("message.content + '<|im_end|>'", "'ok<|im_end|>'")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=f"{d}: the chat template does not write the assistant's reply"):
        tokenize_example(Tokenizer(str(d)), dict(RECORD, reasoning=TRACE), SFTOptions(512, reasoning_traces=True))


def test_rendering_does_not_depend_on_the_day(tmp_path, monkeypatch):
    """Llama 3.2 prints today's date unless pinned: the same record must be the same ids every day."""
    import datetime as real_datetime

    import transformers

    from data import chat_template

    d = make_tokenizer_dir(tmp_path, "llama3.2", REASONING_FAMILIES)
    tok = Tokenizer(str(d))

    def ids_on(day):
        class Frozen(real_datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return cls(2026, 11, day)

        monkeypatch.setattr(chat_template, "datetime", Frozen, raising=False)
        return list(tokenize_example(tok, RECORD, SFTOptions(max_seq_len=512))["tokens"])

    assert ids_on(1) == ids_on(29)
    # the pinned day is data.render_date, passed as transformers users pin it (date_string)
    messages = [{"role": "user", "content": "What is the net change?"}]
    theirs = transformers.AutoTokenizer.from_pretrained(str(d))
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, date_string="26 Jul 2024")
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert tok.encode(tok.render(messages, True)) == list(expected)
    assert "Today Date: 03 Feb 2025" in Tokenizer(str(d), render_date="2025-02-03").render(messages, True)
