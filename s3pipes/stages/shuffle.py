"""ShuffleBuffer: a seeded, resumable sample-level shuffle.

The buffer's order is a pure function of ``(seed, epoch, consumer, input)``. Its
state holds the buffered items themselves (so a resume is exact) and the random
generator's state: the state grows with ``buffer_size`` times the item size; keep
items small (shuffle before decoding) or the buffer modest.
"""

from __future__ import annotations

import random
from typing import Any

from torchdata.nodes import BaseNode

from s3pipes._types import StateDict, T
from s3pipes.stages.base import SOURCE_KEY, Stage

__all__ = ["ShuffleBuffer"]


class ShuffleBuffer(Stage[T]):
    """Yields items in a random order drawn from a buffer of ``buffer_size`` items.

    Args:
        source: the items.
        buffer_size: items held; 1 keeps the input order.
        seed: with ``epoch`` and ``stream`` (the consumer index), fixes the order.
    """

    BUFFER_KEY, RNG_KEY = "buffer", "rng"

    def __init__(
        self, source: BaseNode[T], buffer_size: int, *, seed: int = 0, epoch: int = 0, stream: int = 0
    ) -> None:
        super().__init__()
        if buffer_size <= 0:
            raise ValueError(f"{buffer_size=} must be a positive integer")
        self.source, self.buffer_size = source, buffer_size
        self._seed = f"s3pipes-shuffle:{seed}:{epoch}:{stream}"

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state[SOURCE_KEY] if initial_state is not None else None)
        self._rng = random.Random(self._seed)
        self._buffer: list[T] = []
        if initial_state is not None:
            self._buffer = list(initial_state[self.BUFFER_KEY])
            version, internal, gauss = initial_state[self.RNG_KEY]
            self._rng.setstate((version, tuple(internal), gauss))

    def next(self) -> T:
        while len(self._buffer) < self.buffer_size:
            try:
                self._buffer.append(next(self.source))
            except StopIteration:
                break
        if not self._buffer:
            raise StopIteration
        index = self._rng.randrange(len(self._buffer))
        self._buffer[index], self._buffer[-1] = self._buffer[-1], self._buffer[index]
        self.items_out += 1
        return self._buffer.pop()

    def get_state(self) -> StateDict:
        version, internal, gauss = self._rng.getstate()
        state: dict[str, Any] = {
            SOURCE_KEY: self.source.state_dict(),
            self.BUFFER_KEY: list(self._buffer),
            self.RNG_KEY: [version, list(internal), gauss],
        }
        return state
