"""The training process ``test_training_resume.py`` runs, SIGKILLs and restarts; pytest never runs it.

It trains ``nn.Linear(8, 3)`` with Adam on CPU (fixed seed, deterministic algorithms, one
thread) for :data:`EPOCHS` epochs over a streaming pipeline: ``webdataset`` shards from
``$S3PIPES_TEST_DATA`` with shuffled shards and a seeded shuffle buffer, ``.npy`` features
and ``.cls`` labels, batches of :data:`BATCH`, and ``.checkpoint()`` saving model, optimizer,
epoch and step to the run ``$S3PIPES_TEST_RUN`` every :data:`EVERY` steps and at each epoch
end. If the run has a checkpoint, it resumes from ``store.load()`` first.

Output, unbuffered: ``start <step>`` (0, or the step resumed from), then ``step <n>`` after
each optimizer step, then ``done <n>``. It appends ``<epoch> <key>`` for every sample it
trains on to ``$S3PIPES_TEST_KEYS`` (flushed per step). With ``$S3PIPES_TEST_PAUSE_AFTER=K``
it prints ``paused`` after step K and sleeps, to be killed. The store comes from the
``AWS_*`` variables the test sets.
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from torch import nn

EPOCHS, BATCH, EVERY, FEATURES, CLASSES = 2, 4, 7, 8, 3
SHARDS, PER_SHARD = 6, 20  # 120 samples: 30 steps per epoch


def write_shards(prefix: str, store: Any) -> None:
    """``SHARDS`` tar shards of ``PER_SHARD`` samples (``npy`` features, ``cls`` label) under ``prefix``."""
    import webdataset

    rng = np.random.default_rng(5)
    weights = rng.normal(size=(FEATURES, CLASSES))
    for s in range(SHARDS):
        with store.open(f"{prefix}shard-{s:03d}.tar", "wb") as f, webdataset.TarWriter(f) as writer:
            for i in range(PER_SHARD):
                x = rng.normal(size=FEATURES).astype(np.float32)
                buffer = io.BytesIO()
                np.save(buffer, x)
                label = int(np.argmax(x @ weights + rng.normal(scale=0.5, size=CLASSES)))
                writer.write({"__key__": f"s{s}-{i:02d}", "npy": buffer.getvalue(), "cls": str(label).encode()})


def main() -> None:
    import s3pipes as sp
    from s3pipes.checkpoint import CheckpointStore

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model = nn.Linear(FEATURES, CLASSES)
    optim = torch.optim.Adam(model.parameters(), lr=0.05)
    ckpt = CheckpointStore(os.environ["S3PIPES_TEST_RUN"], keep_last=3)
    pause_after = int(os.environ.get("S3PIPES_TEST_PAUSE_AFTER", "-1"))
    epoch, step = 0, 0

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optim": optim.state_dict(), "epoch": epoch, "step": step}

    pipe = (
        sp.webdataset(os.environ["S3PIPES_TEST_DATA"], shuffle_seed=7)
        .shuffle(16, seed=11)
        .decode()
        .map(lambda s: {"x": torch.from_numpy(s["npy"]), "y": s["cls"], "key": s["__key__"]})
        .batch(BATCH)
        .checkpoint(ckpt, every=EVERY, state=state)
    )
    if ckpt.latest_step() is not None:
        saved = ckpt.load()
        model.load_state_dict(saved["model"])
        optim.load_state_dict(saved["optim"])
        pipe.load_state_dict(saved["data"])
        epoch, step = saved["epoch"], saved["step"]
        assert epoch == saved["data"]["epoch"], (epoch, saved["data"]["epoch"])
    print(f"start {step}", flush=True)
    first_epoch = epoch
    with open(os.environ["S3PIPES_TEST_KEYS"], "a") as keys:
        for epoch in range(first_epoch, EPOCHS):  # state() reads the current epoch
            pipe.set_epoch(epoch)
            for batch in pipe:
                optim.zero_grad()
                torch.autograd.backward(nn.functional.cross_entropy(model(batch["x"]), batch["y"]))
                optim.step()
                step += 1
                keys.write("".join(f"{epoch} {key}\n" for key in batch["key"]))
                keys.flush()
                print(f"step {step}", flush=True)
                if step == pause_after:
                    print("paused", flush=True)
                    time.sleep(120)  # the test kills us; exit on our own if it never does
                    sys.exit(3)
    print(f"done {step}", flush=True)


if __name__ == "__main__":
    main()
