"""Map, Filter and Batch: thin stages whose position is their source's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic

from torch.utils.data import default_collate
from torchdata.nodes import BaseNode

from s3pipes._types import StateDict, T, U
from s3pipes.errors import DataError
from s3pipes.stages.base import SOURCE_KEY, OnError, SkipLog, Stage, ThroughStage, check_on_error
from s3pipes.stages.group import locate_from

__all__ = ["Batch", "Filter", "Map"]


class Map(ThroughStage[U], Generic[T, U]):
    """Applies ``fn`` to every item.

    With ``on_error="skip"``, an item for which ``fn`` raises a :class:`~s3pipes.errors.DataError`
    (e.g. a ``DecodeError``) is dropped and recorded in ``skips``, which is kept in the state
    under ``"skipped"``. Other exceptions always propagate.
    """

    def __init__(self, source: BaseNode[T], fn: Callable[[T], U], *, on_error: OnError = "raise") -> None:
        super().__init__(source)
        self.fn, self.on_error = fn, check_on_error(on_error)
        self.skips = SkipLog()

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.skips = SkipLog.of(initial_state)

    def next(self) -> U:
        while True:
            item: T = next(self.source)
            try:
                out = self.fn(item)
            except DataError as exc:
                locate_from(self.source, exc)  # a DecodeError: add the member and offset
                if self.on_error == "raise":
                    raise
                self.skips.record(exc)
                continue
            self.items_out += 1
            return out

    def get_state(self) -> StateDict:
        return self.skips.save_into(super().get_state(), self.on_error)


class Filter(ThroughStage[T]):
    """Keeps the items for which ``predicate`` is true."""

    def __init__(self, source: BaseNode[T], predicate: Callable[[T], bool]) -> None:
        super().__init__(source)
        self.predicate = predicate

    def next(self) -> T:
        while True:
            item: T = next(self.source)
            if self.predicate(item):
                self.items_out += 1
                return item


class Batch(Stage[Any], Generic[T]):
    """Groups ``batch_size`` items and collates them (torch's ``default_collate`` by default).

    A batch is built whole inside ``next``, so the position between batches is the
    source's: resume never splits a batch. When the source raises part way through a
    batch, the items taken so far stay: the next ``next`` goes on filling the same batch.
    After a store error the state is the source's from before the batch's first item, so
    a resume from it takes them again; after a ``DataError`` (a sample that does not
    decode, counted as taken) it is the source's after that sample, which a resume does
    not meet again (nor the items of the batch before it).
    """

    def __init__(
        self,
        source: BaseNode[T],
        batch_size: int,
        *,
        collate: Callable[[list[T]], Any] | None = default_collate,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"{batch_size=} must be a positive integer")
        self.source, self.batch_size, self.collate, self.drop_last = source, batch_size, collate, drop_last

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state[SOURCE_KEY] if initial_state is not None else None)
        self._items: list[T] = []  # the batch being filled
        self._before: StateDict | None = None  # the source's state before its first item

    def next(self) -> Any:
        if not self._items:
            self._before = self.source.state_dict()
        try:
            for item in self.source:  # an exception leaves the batch so far in self._items
                self._items.append(item)
                if len(self._items) == self.batch_size:
                    break
        except DataError:
            self._before = self.source.state_dict()  # the bad sample counts as taken: never again
            raise
        items, self._items = self._items, []
        if not items or (self.drop_last and len(items) < self.batch_size):
            raise StopIteration
        batch = self.collate(items) if self.collate is not None else items
        self.items_out += 1
        return batch

    def get_state(self) -> StateDict:
        return {SOURCE_KEY: self._before if self._items else self.source.state_dict()}
