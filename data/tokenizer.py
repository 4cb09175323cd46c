"""Tokenizer + chat template from `data.tokenizer_dir` (Hugging Face tokenizer.json or SentencePiece)."""

from __future__ import annotations

import bisect
import itertools
import json
import logging

from etils import epath

from data.chat_template import DEFAULT_RENDER_DATE, FALLBACK_TEMPLATE, parse_render_date, render_chat
from data.records import DataError, MissingDataError

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<|endoftext|>")


def _token_text(value):
    if isinstance(value, dict):  # AddedToken serialised as {"content": ...}
        return value.get("content")
    return value


class Tokenizer:
    """Text <-> ids, chat rendering, and the special ids the SFT pipeline needs."""

    def __init__(
        self,
        tokenizer_dir: str,
        reasoning_traces: bool = False,
        render_date: str = DEFAULT_RENDER_DATE,
        enable_thinking: bool | None = None,
    ):
        """render_date: the "today" a template may write into the prompt (YYYY-MM-DD; see chat_template);
        enable_thinking: the template variable of that name (Qwen3's), None = left undefined."""
        parse_render_date(render_date)
        self.render_date = render_date
        self.enable_thinking = enable_thinking
        d = epath.Path(tokenizer_dir)
        self.dir = str(d)
        config_path = d / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if (d / "tokenizer.json").exists():
            import tokenizers

            self._hf = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
            self._sp = None
        elif (d / "tokenizer.model").exists():
            import sentencepiece

            self._hf = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model"))
        else:
            raise MissingDataError(f"{d}: no tokenizer.json or tokenizer.model")
        template = self.config.get("chat_template")
        if (d / "chat_template.jinja").exists():  # transformers >= 4.5x saves it beside the config
            template = (d / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: use "default"
            template = {t["name"]: t["template"] for t in template}.get("default")
        self.has_template = template is not None
        if not self.has_template:
            logging.warning("%s: no chat template; using the declared ChatML fallback", d)
        self.template = template or FALLBACK_TEMPLATE
        self.special_tokens = {
            k: _token_text(self.config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        self.special_tokens = {k: v for k, v in self.special_tokens.items() if v is not None}
        self.reasoning_traces = reasoning_traces
        self.end_of_turn = self._end_of_turn_token()
        self.end_of_turn_id = self.token_id(self.end_of_turn)

    def _end_of_turn_token(self) -> str:
        """The token the template closes an assistant turn with (rendered, not guessed from a list alone)."""
        probe = self.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "YZ"}], False)
        tail = probe[probe.rfind("YZ") + 2 :]
        for tok in _END_OF_TURN:
            if tail.lstrip().startswith(tok):
                return tok
        eos = self.special_tokens.get("eos_token")
        if eos is None:
            raise DataError(
                f"{self.dir}: cannot tell the end-of-turn token (no eos_token, template ends with {tail!r})"
            )
        return eos

    def token_id(self, token: str) -> int:
        tid = self._hf.token_to_id(token) if self._hf else self._sp.piece_to_id(token)
        if tid is None:
            raise DataError(f"{self.dir}: token {token!r} is not in the vocabulary")
        return int(tid)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True) if self._hf else self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Ids of text with no special tokens added (the template already wrote them)."""
        if self._hf:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if self._hf:
            enc = self._hf.encode(text, add_special_tokens=False)
            return enc.ids, enc.offsets
        # SentencePiece offsets are UTF-8 byte positions; callers cut `text` by character index.
        pieces = self._sp.encode(text, out_type="proto").pieces
        starts = list(itertools.accumulate((len(c.encode()) for c in text), initial=0))  # byte start of each char
        down = lambda b: bisect.bisect_right(starts, b) - 1  # noqa: E731 — the char holding byte b
        up = lambda b: bisect.bisect_left(starts, b)  # noqa: E731 — a mid-character end rounds up
        return [p.id for p in pieces], [(down(p.begin), up(p.end)) for p in pieces]

    def decode(self, ids) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=False) if self._hf else self._sp.decode(list(ids))

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return render_chat(
            self.template, messages, add_generation_prompt, self.special_tokens, self.render_date, self.enable_thinking
        )

    def check_vocab(self, ids, model_vocab_size: int, where: str) -> None:
        bad = [i for i in ids if not 0 <= i < model_vocab_size]
        if bad:
            raise DataError(f"{where}: token id {bad[0]} is outside the model's vocabulary of {model_vocab_size}")


IDS_TOKENIZER_FILE = "ids_tokenizer.json"


class IdsTokenizer:
    """Token ids as text: a record's text is its ids in decimal, space-separated ("17 4 255").

    For data made of model token ids (the planted study's teacher continuations, data/planted/),
    where a round trip through a real tokenizer's text would not be exact (a byte-level tokenizer's
    ids need not decode to valid UTF-8). The "chat template" is concatenation: the prompt is the
    user's ids, the full example is prompt + reply + the end-of-turn id, so the SFT pipeline, the
    loss mask and generation take these ids unchanged. Its directory holds ids_tokenizer.json:
    {"vocab_size": V, "end_of_turn_id": E}."""

    template = "token ids, space-separated: user ids, then reply ids and the end-of-turn id"
    has_template = True
    special_tokens: dict = {}

    def __init__(self, tokenizer_dir: str, reasoning_traces: bool = False, render_date: str = DEFAULT_RENDER_DATE):
        d = epath.Path(tokenizer_dir)
        self.dir = str(d)
        try:
            spec = json.loads((d / IDS_TOKENIZER_FILE).read_text())
            self._vocab, self.end_of_turn_id = int(spec["vocab_size"]), int(spec["end_of_turn_id"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{d / IDS_TOKENIZER_FILE}: expected {{'vocab_size': int, 'end_of_turn_id': int}} ({e})")
        self.end_of_turn = str(self.end_of_turn_id)
        self.reasoning_traces = reasoning_traces
        self.render_date = render_date

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def token_id(self, token: str) -> int:
        return int(token)

    def encode(self, text: str) -> list[int]:
        try:
            return [int(t) for t in text.split()]
        except ValueError:
            raise DataError(f"{self.dir}: expected space-separated token ids, got {text[:40]!r}") from None

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets, pos = [], [], 0
        for t in text.split():
            start = text.index(t, pos)
            ids.append(int(t))
            offsets.append((start, start + len(t)))
            pos = start + len(t)
        return ids, offsets

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        parts = []
        for m in messages:
            parts.append(m["content"].strip())
            if m["role"] == "assistant":
                parts.append(self.end_of_turn)
        return " ".join(p for p in parts if p) + " "

    check_vocab = Tokenizer.check_vocab


def load_tokenizer(
    tokenizer_dir: str,
    reasoning_traces: bool = False,
    render_date: str = DEFAULT_RENDER_DATE,
    enable_thinking: bool | None = None,
):
    """The directory's tokenizer: token ids as text where it holds ids_tokenizer.json, else Tokenizer."""
    if (epath.Path(tokenizer_dir) / IDS_TOKENIZER_FILE).exists():
        return IdsTokenizer(tokenizer_dir, reasoning_traces, render_date)
    return Tokenizer(tokenizer_dir, reasoning_traces, render_date, enable_thinking)
