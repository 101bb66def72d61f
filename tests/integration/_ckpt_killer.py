"""The process ``test_checkpoint_s3.py`` SIGKILLs mid-save; pytest never runs it.

It resumes the run at ``$S3PIPES_TEST_RUN`` after its latest committed step and saves
:func:`make_state` for steps ``latest + 1, latest + 2, ...`` with ``keep_last=3`` until
killed, printing (unbuffered) ``ready`` once set up, then ``begin <step>`` before and
``saved <step>`` after each save. The store comes from ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (set by the test for this process).
"""

from __future__ import annotations

import os
from typing import Any

import torch

WIDE = 6 << 20  # float32s: 24 MiB of constant, plus 8 MiB of seeded noise: 32 MiB, 4 parts of 8 MiB
NOISE = 2 << 20


def make_state(step: int) -> dict[str, Any]:
    """A ~32 MiB state whose every tensor is a function of ``step`` alone."""
    noise = torch.randn(NOISE, generator=torch.Generator().manual_seed(step))
    return {
        "model": {"wide": torch.full((WIDE,), float(step)), "noise": noise},
        "optim": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 0.01}]},
        "data": {"step": step},
    }


def assert_state(state: Any, step: int) -> None:
    """``state`` is exactly ``make_state(step)``."""
    expected = make_state(step)
    assert state["data"] == expected["data"], (state["data"], step)
    for name, tensor in expected["model"].items():
        assert torch.equal(state["model"][name], tensor), f"model.{name} of step {step} differs"
    assert torch.equal(state["optim"]["state"][0]["step"], expected["optim"]["state"][0]["step"])


def main() -> None:
    from s3pipes.checkpoint import CheckpointStore

    ckpt = CheckpointStore(os.environ["S3PIPES_TEST_RUN"], keep_last=3)
    start = (ckpt.latest_step() or 0) + 1
    print("ready", flush=True)
    for step in range(start, start + 100_000):
        state = make_state(step)
        print(f"begin {step}", flush=True)
        ckpt.save(state, step=step)
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    main()
