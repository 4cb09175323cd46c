"""The SFT input pipeline: grain shuffle + map (tokenize), then packing and batching.

The *global* stream — which examples go into which packed row of which global batch — depends only
on the seed and the data, never on the process count: every process walks the same stream and keeps
only its own rows of each global batch (rows p·B/P … (p+1)·B/P − 1). The iterator state is one
integer (the stream cursor), so a run resumed on another mesh or process count sees exactly the
batches an uninterrupted run would.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from data.packing import empty_rows, write_pixels, write_row
from data.records import DataError
from data.sft import SFTOptions, tokenize_example
from data.tokenizer import Tokenizer


class PackedBatchIterator:
    """Yields per-process host batches {"tokens", "targets", "loss_mask", "segment_ids", "positions"}.

    train=True: shuffled, repeated forever (reshuffled each epoch), drops nothing but the examples
    that cannot fit. train=False: one pass in order; the last batch is padded with empty rows
    (segment 0), so every example is evaluated; then StopIteration.
    """

    def __init__(
        self,
        source,
        tokenizer: Tokenizer,
        options: SFTOptions,
        global_batch_size: int,
        *,
        seed: int = 0,
        train: bool = True,
        pack: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        rows: Sequence[int] | None = None,
        read_ahead: int = 64,
        num_threads: int = 4,
    ):
        """rows: the global row indices this process materialises (the trainer derives them from the
        batch sharding); default: an even contiguous split by process_index / process_count."""
        if rows is None and global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by {process_count} processes")
        ds = grain.MapDataset.source(source)
        self.num_records = len(ds)
        if self.num_records == 0:
            raise ValueError("the data source is empty")
        if train:
            ds = ds.shuffle(seed=seed).repeat()
        # Wrapped: grain drops elements that are None, and a dropped example must still move the cursor.
        self._examples = ds.map(lambda record: (tokenize_example(tokenizer, record, opts=options),))
        self.seq_len = options.max_seq_len
        self.image_shape = None
        if options.tokens_per_image:
            if pack:
                raise ValueError("image datasets are not packed (data.pack=False): one example, one image per row")
            self.image_shape = (*options.image_processor.output_size, 3)
        self.global_batch_size = global_batch_size
        if rows is None:
            per = global_batch_size // process_count
            rows = range(process_index * per, (process_index + 1) * per)
        self.local_rows = list(rows)
        self.train, self.pack = train, pack
        self.cursor = 0
        self.dropped = 0  # examples that could not fit (training; counted once per stream position)
        self.truncated_targets = 0  # examples whose target tail was cut to fit (evaluation)
        # grain tokenizes ahead of the cursor on its own threads (its iterator ends them).
        self._read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=read_ahead if num_threads else 0)
        self._stream = None  # grain iterator positioned at self.cursor (+1 when an example is peeked)
        self._peeked: tuple | None = None

    # -- state --------------------------------------------------------------------------------

    def get_state(self) -> dict:
        return {"cursor": int(self.cursor), "dropped": int(self.dropped)}

    def set_state(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.dropped = int(state.get("dropped", 0))
        self._stream, self._peeked = None, None

    # -- stream -------------------------------------------------------------------------------

    def _exhausted(self, i: int) -> bool:
        return not self.train and i >= self.num_records

    def _example(self):
        """The tokenized example at the cursor (None if it cannot fit); `_advance` moves past it."""
        if self._peeked is None:
            if self._stream is None:
                ds = self._examples[self.cursor :] if self.cursor else self._examples
                self._stream = iter(ds.to_iter_dataset(self._read))
            self._peeked = next(self._stream)
        return self._peeked[0]

    def _advance(self) -> None:
        self.cursor += 1
        self._peeked = None

    def _next_row(self) -> list[dict] | None:
        """Consumes examples from the cursor into one row; a row closes when the next does not fit."""
        row, used, skipped = [], 0, 0
        while not self._exhausted(self.cursor):
            ex = self._example()
            if ex is None:
                self.dropped += 1
                self._advance()
                skipped += 1
                if skipped >= self.num_records:
                    raise DataError(  # a user's setting: one error line from main.py, not a traceback
                        f"no example fits data.max_seq_len={self.seq_len} (the instruction and target alone are "
                        "longer, or the target exceeds data.max_target_tokens)"
                    )
                continue
            n = len(ex["tokens"])
            if row and (not self.pack or used + n > self.seq_len):
                break
            row.append(ex)
            used += n
            self._advance()
            self.truncated_targets += bool(ex.get("target_truncated"))
        return row or None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for _ in range(self.global_batch_size):
            row = self._next_row()
            if row is None:
                break
            rows.append(row)
        if not rows or (self.train and len(rows) < self.global_batch_size):
            raise StopIteration
        batch = empty_rows(len(self.local_rows), self.seq_len)
        if self.image_shape:  # LLaVA: [rows, 1, H, W, 3]; a padding row's image is zeros and never read
            batch["pixels"] = np.zeros((len(self.local_rows), 1, *self.image_shape), np.float32)
        for out_row, r in enumerate(self.local_rows):
            if r < len(rows):
                write_row(batch, out_row, rows[r])
                if self.image_shape:
                    write_pixels(batch["pixels"], out_row, rows[r])
        return batch
