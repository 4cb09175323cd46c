"""Input-pipeline throughput on GovReport-length documents (prints examples/s and tokens/s).

    python benchmarks/input_throughput.py [--tokenizer_dir DIR] [--docs 48] [--seq_len 32768]

Without --tokenizer_dir a BPE (vocab 8000) is trained on the synthetic text, so tokens/s reflects a
realistic ~4 characters per token rather than the byte-level test tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data import samples  # noqa: E402
from data.pipeline import PackedBatchIterator  # noqa: E402
from data.prepare import data_sources
from data.sft import SFTOptions  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402

WORDS = "the agency reported program funding oversight federal budget million audit recommendation".split()


def report(i: int, n_words: int) -> str:
    return " ".join(f"{WORDS[(i * 7 + k * 3) % len(WORDS)]}{'.' if k % 17 == 16 else ''}" for k in range(n_words))


def bpe_tokenizer(directory: str) -> str:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=list(samples.SPECIAL_TOKENS))
    tok.train_from_iterator([report(i, 2000) for i in range(20)], trainer)
    tok.save(os.path.join(directory, "tokenizer.json"))
    cfg = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": samples.CHATML_TEMPLATE}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return directory


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer_dir")
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--words", type=int, default=30000, help="words per report (GovReport: ~9K avg, 30K+ long)")
    ap.add_argument("--seq_len", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    tok_dir = args.tokenizer_dir or bpe_tokenizer(tempfile.mkdtemp())
    manual = os.path.join(tmp, "manual")
    os.makedirs(manual)
    for split, n in (("train", args.docs), ("validation", 2)):
        with open(os.path.join(manual, f"{split}.jsonl"), "w") as f:
            for i in range(n):
                f.write(
                    json.dumps({"id": f"{split}-{i}", "input": report(i, args.words), "output": report(i + 1, 300)})
                    + "\n"
                )
    src = data_sources("govreport", manual, os.path.join(tmp, "tfds"))["train"]
    tok = Tokenizer(tok_dir)
    opts = SFTOptions(max_seq_len=args.seq_len)
    it = PackedBatchIterator(src, tok, opts, args.batch, seed=0, num_threads=args.threads)
    next(it)  # warm-up
    start_cursor, t0, tokens, batches = it.cursor, time.perf_counter(), 0, 0
    while it.cursor - start_cursor < args.docs:
        b = next(it)
        tokens += int((b["segment_ids"] > 0).sum())
        batches += 1
    dt = time.perf_counter() - t0
    n_examples = it.cursor - start_cursor
    print(f"documents: {args.words} words, seq_len {args.seq_len}, batch {args.batch}, threads {args.threads}")
    print(f"examples/s: {n_examples / dt:.2f}")
    print(f"tokens/s: {tokens / dt:,.0f}")
    print(f"batches/s: {batches / dt:.2f}  ({batches * args.batch * args.seq_len / dt:,.0f} row-tokens/s)")


if __name__ == "__main__":
    main()
