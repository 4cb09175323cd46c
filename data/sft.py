"""One record -> one SFT example: token ids and the loss mask of the batch contract.

The loss mask comes from the prompt rendered with `add_generation_prompt=True`, which must be a
token prefix of the full rendering. With `reasoning_traces`, the trace must land inside the target:
where a template strips it (DeepSeek-R1-Distill keeps only the text after `</think>`), the
`<think>` block is written where the template starts the reply (see `render_texts`); where even
that cannot work, the example fails with an error naming the tokenizer, never silently. The target runs to and including the end-of-turn token. Long
inputs are truncated by cutting only the `document` field; in training the instruction and the
target are never cut (an example whose instruction + target alone do not fit is dropped and
counted). Evaluation keeps every example: after the document, the target's tail is cut (marked
`target_truncated`, counted by the pipeline), so the longest references still count.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data.records import DataError
from data.tokenizer import Tokenizer

TRUNCATIONS = ("document_end", "document_middle")
_ELLIPSIS = "\n[...]\n"


@dataclasses.dataclass(frozen=True)
class SFTOptions:
    max_seq_len: int
    max_target_tokens: int | None = None
    truncation: str = "document_end"  # cut the document's end, or its middle (keep head and tail)
    reasoning_traces: bool = False
    model_vocab_size: int | None = None
    keep_all: bool = False  # evaluation: never drop; cut the target's tail when nothing else fits
    # LLaVA (image datasets): each image is one placeholder token in the user turn, expanded to the
    # tower's tokens_per_image placeholders (the features replace them); the pixels travel with the example.
    image_token_id: int | None = None
    tokens_per_image: int = 0
    image_processor: object = None  # data.image_processing.ImageProcessor

    def __post_init__(self):
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"data.truncation={self.truncation!r} is unknown; valid: {', '.join(TRUNCATIONS)}")


def record_text(record: dict, key: str) -> str:
    """A text field of a record, as str (tfds gives bytes)."""
    value = record.get(key, "")
    return value.decode("utf-8") if isinstance(value, bytes) else str(value or "")


def user_content(instruction: str, document: str) -> str:
    return f"{instruction}\n\n{document}" if document else instruction


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def think_block(reasoning: str) -> str:
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n"


def assistant_message(tok: Tokenizer, target: str, reasoning: str, with_reasoning: bool) -> dict:
    """Reasoning goes where the family's template puts it: `reasoning_content` if the template reads
    it (e.g. Qwen3's thinking block), else a <think> block before the answer."""
    if not (with_reasoning and reasoning):
        return {"role": "assistant", "content": target}
    if "reasoning_content" in tok.template:
        return {"role": "assistant", "content": target, "reasoning_content": reasoning}
    return {"role": "assistant", "content": think_block(reasoning) + target}


_MARK = "\x02lora_jax-reply\x03"  # finds where the template writes the reply's content


def _spliced(tok: Tokenizer, user: dict, target: str, reasoning: str) -> str:
    """The conversation with the think block written right where the template starts the reply.

    For templates that strip reasoning from assistant turns (DeepSeek-R1-Distill keeps only the text
    after `</think>`) or whose generation prompt already opens a think block: the model is trained
    to write exactly what it is asked to continue at generation time."""
    text = tok.render([user, {"role": "assistant", "content": _MARK + target}], False)
    at = text.find(_MARK)
    if at < 0:
        raise DataError(f"{tok.dir}: the chat template does not write the assistant's reply as given")
    return text[:at] + think_block(reasoning) + text[at + len(_MARK) :]


def prompt_opens_think(tok: Tokenizer) -> bool:
    """Whether the template's generation prompt itself opens a `<think>` block that it leaves open
    (DeepSeek-R1-Distill's 2025 template ends it with `<think>\\n`): the model's reply then starts
    inside the reasoning trace, and has an answer only after it writes `</think>`."""
    text = tok.render([{"role": "user", "content": _MARK}], True)
    after = text[text.find(_MARK) + len(_MARK) :] if _MARK in text else text  # only what the template adds
    return after.rfind(THINK_OPEN) > after.rfind(THINK_CLOSE)


def render_texts(tok: Tokenizer, user: dict, target: str, reasoning: str, with_reasoning: bool) -> tuple[str, str]:
    """(generation prompt, full conversation) as text; the prompt is a prefix of the conversation and,
    when traces are on, the whole trace is in the part after it (the target), or this raises."""
    prompt = tok.render([user], True)
    traced = with_reasoning and bool(reasoning)
    full = tok.render([user, assistant_message(tok, target, reasoning, with_reasoning)], False)
    if full.startswith(prompt) and (not traced or reasoning in full[len(prompt) :]):
        return prompt, full
    full = _spliced(tok, user, target, reasoning if traced else "")
    if not full.startswith(prompt):
        raise DataError(f"{tok.dir}: the generation prompt is not a prefix of the full chat rendering")
    if traced and reasoning not in full[len(prompt) :]:
        raise DataError(
            f"{tok.dir}: the chat template drops reasoning traces from the assistant's reply and no other "
            "rendering keeps them after the generation prompt; set data.reasoning_traces=False"
        )
    return prompt, full


def _images(record) -> list:
    return list(record.get("images") or [])


def _user(tok, record, document, opts) -> dict:
    """The user turn; with images (LLaVA) their placeholder tokens come first, one per image, as the
    LLaVA prompts write `<image>\n` before the question."""
    content = user_content(record_text(record, "instruction"), document)
    n = len(_images(record)) if opts.tokens_per_image else 0
    if n:
        content = tok.decode([opts.image_token_id]) * n + "\n" + content
    return {"role": "user", "content": content}


def expand_image_tokens(ids: list[int], record, opts) -> list[int]:
    """Each image placeholder -> tokens_per_image placeholders; a clear error, naming the example, when
    the rendered prompt does not hold exactly one placeholder per image."""
    if not opts.tokens_per_image:
        return ids
    found, n = ids.count(opts.image_token_id), len(_images(record))
    if found != n:
        more = "more images than placeholders" if n > found else "more placeholders than images"
        raise DataError(
            f"example {record_text(record, 'id')}: {more} ({n} image(s), {found} placeholder token(s) "
            f"id {opts.image_token_id} in the rendered prompt)"
        )
    out = []
    for i in ids:
        out.extend([i] * opts.tokens_per_image if i == opts.image_token_id else [i])
    return out


def example_pixels(record, opts) -> np.ndarray:
    """The example's images for the tower: float32 [images, H, W, 3]."""
    return np.stack([opts.image_processor(img, what=f"example {record_text(record, 'id')}") for img in _images(record)])


def _render_ids(tok, record, document, opts):
    user = _user(tok, record, document, opts)
    prompt_text, full_text = render_texts(
        tok, user, record_text(record, "target"), record_text(record, "reasoning").strip(), opts.reasoning_traces
    )
    prompt = expand_image_tokens(tok.encode(prompt_text), record, opts)
    full = expand_image_tokens(tok.encode(full_text), record, opts)
    if full[: len(prompt)] != prompt:
        raise DataError(f"{tok.dir}: the generation prompt is not a token prefix of the full chat rendering")
    eot = [i for i in range(len(prompt), len(full)) if full[i] == tok.end_of_turn_id]
    if not eot:
        raise DataError(f"{tok.dir}: the rendered target has no end-of-turn token {tok.end_of_turn!r}")
    return prompt, full[: eot[0] + 1]  # drop what the template writes after the end-of-turn token


def generation_prompt_ids(tok: Tokenizer, record: dict, opts: SFTOptions, max_new_tokens: int) -> list[int]:
    """The prompt a model generates from: the user turn rendered with add_generation_prompt=True exactly
    as training renders it, the document cut as training cuts it so that prompt + max_new_tokens fit
    max_seq_len (what is scored is what was trained)."""
    document = record_text(record, "document")
    budget = opts.max_seq_len - max_new_tokens

    def render(document):
        return expand_image_tokens(tok.encode(tok.render([_user(tok, record, document, opts)], True)), record, opts)

    ids, margin = render(document), 0
    while len(ids) > budget and document:
        document = _cut_document(tok, document, len(ids) - budget + margin, opts.truncation)
        ids, margin = render(document), margin * 2 + 8
    return ids


def _cut_document(tok: Tokenizer, document: str, n_remove: int, how: str) -> str:
    ids, offsets = tok.encode_with_offsets(document)
    keep = len(ids) - n_remove
    if keep <= 0:
        return ""
    if how == "document_end":
        return document[: offsets[keep - 1][1]]
    head = keep // 2
    tail = keep - head
    return document[: offsets[head - 1][1] if head else 0] + _ELLIPSIS + document[offsets[len(ids) - tail][0] :]


def tokenize_example(tok: Tokenizer, record: dict, opts: SFTOptions) -> dict | None:
    """-> {"tokens", "targets", "loss_mask", "target_truncated"} (numpy, one segment), or None if it
    cannot fit (training only)."""
    document = record_text(record, "document")
    prompt, full = _render_ids(tok, record, document, opts)
    n_target = len(full) - len(prompt)
    if not opts.keep_all and opts.max_target_tokens is not None and n_target > opts.max_target_tokens:
        return None
    margin, truncated = 0, False
    while len(full) > opts.max_seq_len:
        if not document:
            if not opts.keep_all or len(prompt) > opts.max_seq_len:
                return None  # the instruction (and its images) + target alone are too long
            full, truncated = full[: opts.max_seq_len], True  # evaluation: the target's tail goes
            break
        document = _cut_document(tok, document, len(full) - opts.max_seq_len + margin, opts.truncation)
        prompt, full = _render_ids(tok, record, document, opts)
        margin = margin * 2 + 8  # re-rendering at the cut can merge tokens differently
    if opts.model_vocab_size is not None:
        tok.check_vocab(full, opts.model_vocab_size, f"{tok.dir} (example {record_text(record, 'id')})")
    ids = np.asarray(full, np.int32)
    targets = np.append(ids[1:], 0).astype(np.int32)
    loss_mask = np.zeros(len(ids), np.float32)
    loss_mask[len(prompt) - 1 : len(ids) - 1] = 1.0  # position t predicts ids[t + 1]
    out = {"tokens": ids, "targets": targets, "loss_mask": loss_mask, "target_truncated": truncated}
    if opts.tokens_per_image:
        out["pixels"] = example_pixels(record, opts)
    return out
