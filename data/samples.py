"""Bundled tiny samples for `:runlocal`: a few records per dataset in each upstream schema, and a tiny
byte-level tokenizer with a ChatML chat template — all written deterministically by this module
(nothing copied from elsewhere), then read through the same builders and pipeline as real data.
"""

from __future__ import annotations

import json
import os
import random
import struct
import zlib

from etils import epath

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _write_if_changed(path: epath.Path, data: bytes) -> None:
    """Rewriting identical files would change their mtimes and make prepared datasets look stale."""
    if not (path.exists() and path.read_bytes() == data):
        tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        tmp.replace(path)


def write_tiny_tokenizer(directory, image_token: bool = False) -> str:
    """A byte-level BPE with no merges (every byte is a token) + ChatML specials: vocab 259; with
    image_token, also LLaVA's `<image>` placeholder (id 259, vocab 260)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    d = epath.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = tokenizers.Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS) + (["<image>"] if image_token else []))
    _write_if_changed(d / "tokenizer.json", tok.to_str(pretty=True).encode())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 4096,
    }
    _write_if_changed(d / "tokenizer_config.json", json.dumps(config, indent=2).encode())
    return str(d)


def tiny_png(width: int, height: int, seed: int) -> bytes:
    """A valid RGB PNG with a deterministic pattern (stand-in for scanned invoices / photos)."""
    raw = b"".join(
        b"\x00" + bytes(((x * 7 + y * 13 + seed * 31) % 256) for x in range(width) for _ in range(3))
        for y in range(height)
    )

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


_MEMBERS = ["Alvarez", "Brooks", "Chen", "Dawson", "Ellis", "Fischer", "Garcia", "Hughes"]
_TOPICS = ["rural broadband", "flood insurance", "drug pricing", "port security", "wildfire response", "AI safety"]


def _hearing(i: int) -> dict:
    members = _MEMBERS[i % 4 : i % 4 + 4]
    topic = _TOPICS[i % len(_TOPICS)]
    speeches = "\n\n".join(
        f"Senator {m}. Thank you, Chairman. On {topic}, my constituents ask for clear timelines; "
        f"item {k} of the record shows costs rising {3 + k}% a year."
        for k, m in enumerate(members * 3)
    )
    transcript = (
        f"[Senate Hearing 118-{100 + i}]\nHEARING ON {topic.upper()}\nCommittee on Commerce\n"
        f"Held March {i + 1}, 2024\nPresent: Senators {', '.join(members)}.\n\n{speeches}\n"
        f"WITNESS: Dr. Pat Lee, Director, Office of {topic.title()}.\nThe hearing adjourned."
    )
    target = {
        "title": f"Hearing on {topic.title()}",
        "congress": "118",
        "chamber": "Senate",
        "committee": "Committee on Commerce",
        "held_date": f"March {i + 1}, 2024",
        "members_present": members,
        "witnesses": [f"Dr. Pat Lee, Director, Office of {topic.title()}"],
        "topic": topic,
        "outcomes": ["record held open for two weeks"],
    }
    return {"id": f"CHRG-118shrg{90000 + i}", "transcript": transcript, "target": target}


def _mcq(i: int) -> dict:
    """MedMCQA raw schema; the correct option is at index i % 4 (cop is 1-indexed: 1 + i % 4)."""
    a, b = 2 + i, 3 + 2 * i
    opts = [str(a * b), str(a - b), str(b - a), str(a * b + 1)]
    opts.insert(i % 4, str(a + b))
    return {
        "question": f"What is {a} plus {b}?",
        "opa": opts[0],
        "opb": opts[1],
        "opc": opts[2],
        "opd": opts[3],
        "exp": f"{a} + {b} = {a + b}.",
        "subject_name": "Arithmetic",
        "topic_name": None,
        "id": f"sample-mcq-{i}",
        "choice_type": "single",
        "cop": 1 + i % 4,
    }


def write_sample_manual_dir(name: str, directory) -> str:
    """Writes a handful of records of dataset `name` in its upstream schema into `directory`."""
    d = epath.Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def jsonl(filename, rows):
        (d / filename).parent.mkdir(parents=True, exist_ok=True)
        _write_if_changed(d / filename, "".join(json.dumps(r) + "\n" for r in rows).encode())

    if name == "cocohd":
        jsonl("cocohd.jsonl", [_hearing(i) for i in range(12)])
    elif name == "govreport":
        rep = lambda i: " ".join(
            f"Section {k}: agency {i} spent {k * 10 + i} million on program {k}." for k in range(40)
        )  # noqa: E731
        rows = [{"id": f"gao-{i}", "input": rep(i), "output": f"Agency {i} funded 40 programs."} for i in range(10)]
        jsonl("train.jsonl", rows[:7])
        jsonl("validation.jsonl", rows[7:])
    elif name == "medmcqa":
        rows = [_mcq(i) for i in range(12)]  # raw GitHub schema, 1-indexed
        jsonl("train.json", rows[:8])
        jsonl("dev.json", rows[8:])
    elif name == "medreason":
        jsonl("dev.json", [_mcq(i) for i in range(8, 12)])
        rows = []
        for i in range(10):
            m = _mcq(i)
            options = "Answer Choices:\n" + "\n".join(f"{L}. {m['op' + L.lower()]}" for L in "ABCD")
            correct = m["op" + "abcd"[i % 4]]
            rows.append(
                {
                    "question": m["question"],
                    "options": options,
                    "answer": f"{correct}. Explanation: add the numbers.",
                    "reasoning": f"Adding gives {correct}.",
                    "dataset_name": "sample",
                }
            )
        jsonl("medreason.jsonl", rows)
    elif name == "fincot":
        train = [
            {
                "Question": (
                    "Please answer the given financial question based on the context.\n"
                    f"Context: Revenue rose from {100 + i} to {120 + 2 * i} million.\n"
                    "Question: What is the change?\nAnswer:"
                ),
                "Reasoning_process": f"{120 + 2 * i} - {100 + i} = {20 + i}.",
                "Final_response": f"{20 + i} million",
            }
            for i in range(8)
        ]
        test = [
            {
                "id": f"finqa-{i}",
                "question": f"what is the change in cost from {10 + i} to {15 + i}?",
                "context": f"cost was {10 + i} in 2019 and {15 + i} in 2020 .",
                "answer": "5",
            }
            for i in range(4)
        ]
        jsonl("fincot_sft.jsonl", train)
        jsonl("finqa_test.jsonl", test)
    elif name == "llavacot":
        rows = []
        for i in range(8):
            (d / f"images/{i}.png").parent.mkdir(parents=True, exist_ok=True)
            _write_if_changed(d / f"images/{i}.png", tiny_png(8, 8, i))
            answer = (
                f"<SUMMARY> Count the squares. </SUMMARY>\n<CAPTION> A grid pattern {i}. </CAPTION>\n"
                f"<REASONING> There are {i + 1} squares. </REASONING>\n<CONCLUSION> {i + 1} </CONCLUSION>"
            )
            rows.append(
                {
                    "id": f"sample-{i}",
                    "image": f"images/{i}.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nHow many squares are there?"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
        jsonl("train.jsonl", rows)
    elif name == "invoiceocr":
        for split, n in (("train", 6), ("test", 2)):
            rows = []
            for i in range(n):
                (d / split / f"invoice_{i}.png").parent.mkdir(parents=True, exist_ok=True)
                _write_if_changed(d / split / f"invoice_{i}.png", tiny_png(16, 8, i))
                gt = {
                    "gt_parse": {
                        "header": {"invoice_no": f"{1000 + i}", "invoice_date": "01/02/2024"},
                        "items": [{"item_desc": "Pens", "item_qty": f"{i + 1},00"}],
                        "summary": {"total_gross_worth": f"$ {10 * (i + 1)},00"},
                    }
                }
                rows.append({"file_name": f"invoice_{i}.png", "ground_truth": json.dumps(gt)})
            jsonl(f"{split}/metadata.jsonl", rows)
    elif name == "planted":  # the layout a planted teacher writes (lora_jax/run/planted.py), ids of the tiny tokenizer
        rng = random.Random(0)
        rows = [
            {
                "id": f"planted-{i}",
                "split": "train" if i < 8 else "test",
                "prompt_ids": [rng.randrange(256) for _ in range(8)],
                "target_ids": [rng.randrange(256) for _ in range(12)],
            }
            for i in range(12)
        ]
        jsonl("planted.jsonl", rows)
        jsonl("tokenizer/ids_tokenizer.json", [{"vocab_size": 259, "end_of_turn_id": 258}])
    else:
        raise ValueError(f"no bundled sample for dataset {name!r}")
    return str(d)
