"""TensorBoard events written without TensorFlow, read back by TensorBoard's own reader."""

import subprocess
import sys

import pytest

from eval.events import EventWriter, LoggingWriter
from tests.cli import ROOT


def _accumulator(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    ea.Reload()
    return ea


def test_scalars_texts_and_hparams_read_back_with_tensorboard(tmp_path):
    from tensorboard.plugins.hparams import metadata as hparams_metadata
    from tensorboard.util import tensor_util

    writer = EventWriter(tmp_path)
    writer.write_hparams({"arm": "oproj_fc2", "lr": 0.002, "rank": 8, "remat": True}, trial_id="cocohd_oproj_fc2_s0")
    writer.write_scalars(10, {"loss": 5.25, "mfu": 0.5})
    writer.write_scalars(20, {"loss": 4.75})
    writer.write_texts(20, {"eval/samples": "| prompt | reply |"})
    writer.flush()

    ea = _accumulator(tmp_path)
    loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in ea.Tensors("loss")]
    assert loss == [(10, 5.25), (20, 4.75)]
    assert ea.SummaryMetadata("loss").plugin_data.plugin_name == "scalars"
    assert ea.SummaryMetadata("eval/samples").plugin_data.plugin_name == "text"
    assert tensor_util.make_ndarray(ea.Tensors("eval/samples")[0].tensor_proto).item() == b"| prompt | reply |"

    tag = hparams_metadata.SESSION_START_INFO_TAG
    info = hparams_metadata.parse_session_start_info_plugin_data(ea.SummaryMetadata(tag).plugin_data.content)
    assert info.group_name == "cocohd_oproj_fc2_s0"
    assert info.hparams["arm"].string_value == "oproj_fc2" and info.hparams["lr"].number_value == 0.002
    assert info.hparams["rank"].number_value == 8 and info.hparams["remat"].bool_value is True
    writer.close()


def test_two_writers_of_one_process_write_two_files_and_other_processes_none(tmp_path):
    for _ in range(2):
        w = EventWriter(tmp_path / "run")
        w.write_scalars(1, {"loss": 1.0})
        w.close()
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 2
    assert [e.step for e in _accumulator(tmp_path / "run").Tensors("loss")] == [1, 1]

    quiet = LoggingWriter(tmp_path / "process_1")
    quiet.write_scalars(1, {"loss": 1.0})
    quiet.write_hparams({"arm": "qkv"})
    quiet.flush()
    assert not (tmp_path / "process_1").exists()


WRITERS = {
    "the run's writer": "from lora_jax.run.assemble import metric_writer\nw = metric_writer(out)\n",
    "the report's hparams": (
        "from eval.report import RunResult, write_hparams\n"
        "write_hparams([RunResult('r', 'cocohd', 'qkv', 0, 'json_key_value_match', {'a': 1.0}, 0, 'b', tpot_unmerged=2.0)],"
        " out)\n"
        "from eval.events import EventWriter\nw = EventWriter(out + '/r', log_scalars=False)\n"
    ),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_writing_events_imports_no_tensorflow(tmp_path, writer):
    """TensorFlow's import costs seconds at every start of main.py and prints its own lines."""
    code = (
        f"import sys\nout = {str(tmp_path)!r}\n"
        + WRITERS[writer]
        + "w.write_scalars(0, {'x': 1.0}); w.write_texts(0, {'t': 's'}); w.write_hparams({'a': 1}); w.close()\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.rglob("events.out.tfevents.*"))
