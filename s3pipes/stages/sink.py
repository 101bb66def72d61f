"""CheckpointSink: a pass-through last stage that saves training state and the data position together."""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import get_worker_info
from torchdata.nodes import BaseNode

from s3pipes._types import StateDict, T
from s3pipes.checkpoint import CheckpointStore
from s3pipes.errors import ConfigError
from s3pipes.stages.base import SOURCE_KEY, Stage

__all__ = ["CheckpointSink"]


def _weights_only_refusal(data: StateDict) -> str | None:
    """Why ``torch.load(weights_only=True)`` would refuse ``data`` (a data position), or None."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    buffer.seek(0)
    try:
        torch.load(buffer, weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).partition("WeightsUnpickler error:")[2].strip().split("\n")[0]
        return reason.split(" was not an allowed global")[0].strip() or str(exc)
    return None


class CheckpointSink(Stage[T]):
    """Yields its source's items unchanged and saves ``{**state(), "data": <position>}`` to ``store``.

    A save is due after every ``every``-th item (counted across epochs) and at the end of
    each epoch. It happens when the *next* item is asked for (or the source runs out), i.e.
    after the training loop has finished with the item: ``state()`` then describes a model
    trained on everything up to it, and ``"data"`` is the position right after it. (The next
    item is pulled before the save, so that a save at an epoch's end says so; a failed save
    keeps it for the next call, and the position stays the one before it.)
    The step of a save is the number of items yielded so far, across epochs; it is part of
    this stage's state, so it carries on after ``load_state_dict``, and from one pass of a
    ``Pipe`` to the next (also from a loaded state that ``set_epoch`` set aside for another
    epoch). Not carried: a new ``Pipe`` that loads no state counts from 0 again. Resume:
    ``saved = store.load()``, restore the model and optimizer,
    ``pipe.load_state_dict(saved["data"])``, then go on from ``saved["data"]["epoch"]`` (a save
    at an epoch's end may also go on from the next epoch: it has ``"ended": True``).

    It must be the last stage, and it saves from the process that iterates it: put it after
    ``.batch()`` so that it counts training steps, iterate the pipe directly or through
    ``DataLoader(pipe, batch_size=None, num_workers=0)``. With DataLoader workers, save
    ``StatefulDataLoader.state_dict()`` yourself instead.

    Args:
        source: the items.
        store: where to save; one writer per run.
        every: save after every ``every`` items (a positive int).
        state: what to save besides the data position, e.g. model and optimizer state dicts.
            The key ``"data"`` is reserved for the position.
        wrap: turns this stage's state into the saved ``"data"`` (a ``Pipe`` passes its
            ``state_dict()`` format), told with ``ended=True`` that the epoch's items are all
            out; None saves this stage's state as it is.
        start: the step to count from when reset without a state.

    Raises:
        ValueError: ``every`` is not a positive int; ``state()`` returned a ``"data"`` key.
        ConfigError: iterated inside a DataLoader worker.

    Example:
        >>> from torchdata.nodes import IterableWrapper
        >>> from s3pipes.store import Store
        >>> ckpt = CheckpointStore("memory://doc-sink/run", store=Store())
        >>> list(CheckpointSink(IterableWrapper(range(5)), ckpt, every=2))
        [0, 1, 2, 3, 4]
        >>> ckpt.steps(), ckpt.load()["data"]["step"]
        ([2, 4, 5], 5)
    """

    STEP_KEY = "step"

    def __init__(
        self,
        source: BaseNode[T],
        store: CheckpointStore,
        *,
        every: int,
        state: Callable[[], Mapping[str, Any]] | None = None,
        wrap: Callable[..., StateDict] | None = None,
        start: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"checkpoint(): {every=} must be a positive int (items between saves)")
        self.source, self.store, self.every, self.start = source, store, every, start
        self.state, self.wrap = state, wrap
        self._checked = False  # whether torch.load(weights_only=True) takes the position

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        if get_worker_info() is not None:
            raise ConfigError(
                f"checkpoint() to {self.store.url} runs in a DataLoader worker, where it would save the worker's "
                "own data position and model copy: use num_workers=0, or drop .checkpoint() and save "
                "StatefulDataLoader.state_dict() from the training loop"
            )
        self.source.reset(initial_state[SOURCE_KEY] if initial_state is not None else None)
        self._step = int(initial_state[self.STEP_KEY]) if initial_state is not None else self.start
        self._saved = self._step  # a loaded (or starting) position needs no save of its own
        self._held: tuple[T] | None = None  # the next item, pulled before a due save
        self._before: StateDict = {}  # the position before it

    def next(self) -> T:
        if self._step != self._saved and self._step % self.every == 0:
            if self._held is None:  # pull the next item first: a save at the epoch's end says so
                self._before = self.get_state()
                try:
                    self._held = (next(self.source),)
                except StopIteration:
                    self._save(self._before, ended=True)
                    raise
            self._save(self._before)  # if it fails, the item pulled stays held, the position before it
        if self._held is not None:
            (item,), self._held = self._held, None
        else:
            try:
                item = next(self.source)
            except StopIteration:
                if self._step != self._saved:
                    self._save(self.get_state(), ended=True)
                raise
        self._step += 1
        self.items_out += 1
        return item

    def get_state(self) -> StateDict:
        if self._held is not None:
            return self._before
        return {SOURCE_KEY: self.source.state_dict(), self.STEP_KEY: self._step}

    @classmethod
    def step_of(cls, state: StateDict | None) -> int:
        """The step count in a state of this stage (0 for None): where the next pass goes on from."""
        return int(state[cls.STEP_KEY]) if state is not None else 0

    def _save(self, data: StateDict, *, ended: bool = False) -> None:
        extra = dict(self.state()) if self.state is not None else {}
        if "data" in extra:
            raise ValueError(f"checkpoint(): state() returned a 'data' key {sorted(extra)}; it is the data position's")
        if not self._checked:  # once: what a position holds keeps its types from save to save
            self._checked = True
            refusal = _weights_only_refusal(data)
            if refusal is not None:
                warnings.warn(
                    f"checkpoint() to {self.store.url}: load()'s default weights_only=True will refuse these "
                    f"checkpoints, as the data position holds objects it does not load ({refusal}): a shuffle "
                    "buffer after decode or map keeps its samples in the state. Load them with "
                    "weights_only=False (you wrote them), or shuffle before decoding (a smaller state too)",
                    UserWarning,
                    stacklevel=2,
                )
        self.store.save(
            {**extra, "data": self.wrap(data, ended=ended) if self.wrap is not None else data}, step=self._step
        )
        self._saved = self._step
