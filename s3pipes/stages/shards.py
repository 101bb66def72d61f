"""Shard planning and the stage that yields this consumer's shard URLs.

A :class:`ShardPlan` is the sorted list of shard URLs plus how to order and split it.
Planning steps return new plans; nothing here does I/O. The order of an epoch is a
pure function of ``(seed, epoch, urls)``, and the split is a pure function of the
order and the consumer ``(rank, world_size, worker, num_workers)``: every shard goes
to exactly one consumer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from s3pipes._types import StateDict
from s3pipes.stages.base import Stage

__all__ = ["Consumer", "ShardPlan", "Shards", "TooFewShards"]


class TooFewShards(ValueError):
    """Fewer shards than consumers: some rank or worker would get nothing (and DDP would hang)."""


@dataclass(frozen=True)
class Consumer:
    """Who is reading: a DataLoader worker of a distributed rank."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.world_size}, worker {self.worker}/{self.num_workers}"


@dataclass(frozen=True)
class ShardPlan:
    """Which shards, in which order, split how.

    Args:
        urls: the shard URLs, in their canonical (sorted) order.
        seed: shuffle the order per epoch with this seed; None keeps it.
        split: give each consumer a disjoint subset (True), or every consumer all shards.

    Example:
        >>> plan = ShardPlan(("a", "b", "c", "d"), seed=0)
        >>> plan.order(epoch=0) == plan.order(epoch=0), sorted(plan.order(epoch=1))
        (True, ['a', 'b', 'c', 'd'])
        >>> ShardPlan(("a", "b", "c", "d")).assigned(epoch=0, consumer=Consumer(worker=1, num_workers=2))
        ['b', 'd']
    """

    urls: tuple[str, ...]
    seed: int | None = None
    split: bool = True

    def shuffled(self, seed: int) -> ShardPlan:
        return replace(self, seed=seed)

    def order(self, epoch: int) -> list[str]:
        """This epoch's order of all shards."""
        urls = list(self.urls)
        if self.seed is not None:
            random.Random(f"s3pipes-shards:{self.seed}:{epoch}").shuffle(urls)
        return urls

    def assigned(self, epoch: int, consumer: Consumer) -> list[str]:
        """The shards ``consumer`` reads in ``epoch``: every ``count``-th, from its index.

        Raises:
            TooFewShards: fewer shards than consumers (raised by every consumer alike,
                so no rank waits for another that has nothing to do).
        """
        urls = self.order(epoch)
        if not self.split or consumer.count == 1:
            return urls
        if len(urls) < consumer.count:
            raise TooFewShards(
                f"{len(urls)} shard(s) for {consumer.world_size} rank(s) x {consumer.num_workers} "
                f"DataLoader worker(s) = {consumer.count} consumers: each consumer needs at least one shard. "
                "Write more, smaller shards, or use fewer workers."
            )
        return urls[consumer.index :: consumer.count]


class Shards(Stage[str]):
    """Yields the shard URLs assigned to one consumer in one epoch.

    State: ``{"epoch": e, "index": i}``, i = how many URLs were already yielded.
    """

    EPOCH_KEY, INDEX_KEY = "epoch", "index"

    def __init__(self, plan: ShardPlan, *, epoch: int, consumer: Consumer) -> None:
        super().__init__()
        self.plan, self.epoch, self.consumer = plan, epoch, consumer

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        if initial_state is not None:
            self.epoch = int(initial_state[self.EPOCH_KEY])
        self._urls = self.plan.assigned(self.epoch, self.consumer)
        self._index = int(initial_state[self.INDEX_KEY]) if initial_state is not None else 0

    def next(self) -> str:
        if self._index >= len(self._urls):
            raise StopIteration
        self._index += 1
        self.items_out += 1
        return self._urls[self._index - 1]

    def get_state(self) -> StateDict:
        return {self.EPOCH_KEY: self.epoch, self.INDEX_KEY: self._index}
