"""Issue 5 item 2: kill a training process mid-epoch, restart it from ``store.load()``, get the same model.

``_train_job.py`` (see its docstring) trains for 2 epochs of 30 steps on shards in SeaweedFS,
its ``.checkpoint()`` sink saving every 7 steps and at each epoch end. One run goes through
uninterrupted. Another is SIGKILLed after step 17 (epoch 0; last save: step 14), restarted,
SIGKILLed again after step 45 (epoch 1; last save: step 42), and restarted to the end. The
final model and optimizer must equal the uninterrupted run's bit for bit, and each restart
must train on exactly the samples after its checkpoint, in the same order.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from s3pipes import Store
from s3pipes.checkpoint import CheckpointStore
from s3pipes.server import LocalS3Server
from tests.integration import _train_job as job

pytestmark = pytest.mark.integration

JOB = Path(__file__).with_name("_train_job.py")
STEPS = job.EPOCHS * job.SHARDS * job.PER_SHARD // job.BATCH  # 60
JOB_TIMEOUT = 60.0  # seconds a job may take before the test gives up on it


def run_job(env: dict[str, str], keys: Path, *, pause_after: int | None = None) -> tuple[list[str], list[str]]:
    """Run the job to its end, or until it pauses after step ``pause_after`` and is SIGKILLed.

    Returns (its stdout lines, the ``"<epoch> <key>"`` lines it trained on).
    """
    env = {**env, "S3PIPES_TEST_KEYS": str(keys)}
    if pause_after is not None:
        env["S3PIPES_TEST_PAUSE_AFTER"] = str(pause_after)
    with subprocess.Popen(
        [sys.executable, "-u", str(JOB)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    ) as process:
        watchdog = threading.Timer(JOB_TIMEOUT, process.kill)
        watchdog.start()
        try:
            assert process.stdout is not None and process.stderr is not None
            lines = []
            for line in process.stdout:
                lines.append(line.strip())
                if line == "paused\n":
                    process.send_signal(signal.SIGKILL)
                    break
            process.wait()
            errors = process.stderr.read()
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
    expected = -signal.SIGKILL if pause_after is not None else 0
    assert process.returncode == expected, f"job exited with {process.returncode}; stderr:\n{errors[-3000:]}"
    return lines, keys.read_text().splitlines()


def test_killed_and_restarted_training_ends_with_the_same_weights(
    s3_server: LocalS3Server, s3_store: Store, s3_root: str, tmp_path: Path
) -> None:
    data = f"{s3_root}/data/"
    job.write_shards(data, s3_store)
    env = {**os.environ, **s3_server.env(), "S3PIPES_TEST_DATA": data, "OMP_NUM_THREADS": "1"}

    straight_run = CheckpointStore(f"{s3_root}/straight", store=s3_store)
    out, everything = run_job({**env, "S3PIPES_TEST_RUN": straight_run.url}, tmp_path / "straight.keys")
    assert out[0] == "start 0" and out[-1] == f"done {STEPS}"
    assert len(everything) == STEPS * job.BATCH
    epoch0, epoch1 = ([line for line in everything if line.startswith(f"{e} ")] for e in range(2))
    assert sorted(k.split()[1] for k in epoch0) == sorted(k.split()[1] for k in epoch1), "an epoch is not all samples"
    assert [k.split()[1] for k in epoch0] != [k.split()[1] for k in epoch1], "the epochs have the same order"
    assert straight_run.steps() == [49, 56, 60]  # keep_last=3; saves every 7 steps and at 30 and 60

    killed_run = CheckpointStore(f"{s3_root}/killed", store=s3_store)
    env["S3PIPES_TEST_RUN"] = killed_run.url
    start = 0
    for pause_after, last_save in [(17, 14), (45, 42)]:  # mid-epoch 0, mid-epoch 1; neither a save step
        out, seen = run_job(env, tmp_path / f"killed-after-{pause_after}.keys", pause_after=pause_after)
        assert out[0] == f"start {start}" and out[-2:] == [f"step {pause_after}", "paused"]
        assert seen == everything[start * job.BATCH : pause_after * job.BATCH], f"run killed after {pause_after}"
        assert killed_run.latest_step() == last_save
        start = last_save
    out, seen = run_job(env, tmp_path / "finished.keys")
    assert out[0] == f"start {start}" and out[-1] == f"done {STEPS}"
    assert seen == everything[start * job.BATCH :], "the restart did not train on exactly the rest of the data"

    straight, resumed = straight_run.load(), killed_run.load()
    assert resumed["step"] == straight["step"] == STEPS and resumed["epoch"] == straight["epoch"] == 1
    assert resumed["data"] == straight["data"]
    for name, tensor in straight["model"].items():
        assert torch.equal(resumed["model"][name], tensor), f"model.{name} differs from the uninterrupted run"
    for index, param_state in straight["optim"]["state"].items():
        for name, value in param_state.items():
            assert torch.equal(resumed["optim"]["state"][index][name], value), f"optim state {index}.{name} differs"
