"""One process of a 2-process start on localhost, as main.py starts: distributed init, then the
checkpoint store on a shared workdir, one save, and the store reopened as a resumed run opens it.

Usage: python two_process_start.py WORKDIR PORT PROCESS_ID DELAY_S
DELAY_S holds this process back before it touches the workdir, as a slower host would be; with the
old per-process existence check, a late process 1 saw process 0's fresh checkpoints/ and entered
other orbax barriers than process 0 (AssertionError: sync_global_devices name mismatch)."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(workdir: str, port: int, process_id: int, delay_s: float) -> None:
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from lora_jax.io.checkpoints import CheckpointStore

    replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("d",)), jax.sharding.PartitionSpec())
    lora = {"a": jax.make_array_from_callback((4,), replicated, lambda index: np.ones(4, np.float32)[index])}
    opt = {"count": jax.make_array_from_callback((), replicated, lambda index: np.zeros((), np.int32))}
    identity = {"arm": "oproj", "base_fingerprint": "x"}
    time.sleep(delay_s)
    store = CheckpointStore(workdir, 2, identity)
    store.save(1, lora, opt, {"cursor": 1}, {"loss": 1.0})
    store.wait()
    time.sleep(delay_s)
    resumed = CheckpointStore(workdir, 2, identity)
    assert resumed.latest_step() == 1
    restored, _, data, _ = resumed.restore(1, lora, opt)
    assert data == {"cursor": 1} and float(restored["a"].addressable_data(0).sum()) == 4.0
    print("ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
