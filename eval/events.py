"""TensorBoard event files written without TensorFlow.

A run's scalars, texts and hparams are protobufs that TensorBoard's own summary helpers build
(`scalar_pb`, `text_pb`, `hparams_pb`: the same messages `tf.summary` writes), framed as TFRecords by
TensorBoard's `RecordWriter`. Importing TensorFlow for `tf.summary` (as clu's SummaryWriter does) costs
5–10 s at every start of main.py and prints TensorFlow's start-up lines; this costs neither.

`EventWriter` has the interface of clu's `MetricWriter` that the training loop and the evaluators use:
write_scalars, write_texts, write_hparams, flush, close. Scalars also go to the INFO log, as clu's
default writer logs them. Paths go through etils.epath, so a gs:// workdir works as for checkpoints.
"""

import itertools
import os
import socket
import time
from collections.abc import Mapping

from absl import logging
from etils import epath

_FILE_NUMBERS = itertools.count()  # two writers of one process and second never share a file


class EventWriter:
    """Appends events to one new `events.out.tfevents.*` file in `logdir` (created on first write).
    Written events reach the file at least every `flush_secs` (as tf.summary's writer flushes on a
    timer), so TensorBoard follows a running job and a killed one loses at most that much."""

    def __init__(self, logdir: str | os.PathLike, log_scalars: bool = True, flush_secs: float = 10.0):
        self._logdir = epath.Path(logdir)
        self._log_scalars = log_scalars
        self._flush_secs = flush_secs
        self._file = None
        self._records = None
        self._flushed = time.monotonic()

    def _write(self, step: int, summary) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        if self._file is None:
            self._logdir.mkdir(parents=True, exist_ok=True)
            now = time.time()
            name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBERS)}.v2"
            self._file = (self._logdir / name).open("wb")
            self._records = RecordWriter(self._file)
            self._records.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
        self._records.write(event.SerializeToString())
        if time.monotonic() - self._flushed >= self._flush_secs:
            self.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.scalar.summary_v2 import scalar_pb

        if self._log_scalars:
            logging.info("[%d] %s", step, ", ".join(f"{k}={v}" for k, v in scalars.items()))
        values = [value for k, v in scalars.items() for value in scalar_pb(k, float(v)).value]
        self._write(step, summary_pb2.Summary(value=values))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.text.summary_v2 import text_pb

        values = [value for k, v in texts.items() for value in text_pb(k, str(v)).value]
        self._write(step, summary_pb2.Summary(value=values))

    def write_hparams(self, hparams: Mapping[str, object], trial_id: str | None = None) -> None:
        """One trial's hyperparameters (bool, int, float or str values) for TensorBoard's HParams tab."""
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb

        self._write(0, hparams_pb(dict(hparams), trial_id=trial_id))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class LoggingWriter(EventWriter):
    """The writer of a process other than 0 in a multi-process run: scalars to the log, no files."""

    def _write(self, step: int, summary) -> None:
        pass
