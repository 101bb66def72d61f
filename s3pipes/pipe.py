"""Pipe: the fluent facade. Each method adds one stage; a Pipe IS a PyTorch IterableDataset.

A Pipe is a recipe, not a running iterator: the shard plan plus a list of stage
steps. ``iter(pipe)`` builds the stage graph for the consumer it runs in (rank from
``torch.distributed`` or ``RANK``/``WORLD_SIZE``, worker from DataLoader's worker
info), so the same Pipe handed to a ``DataLoader(num_workers=N)`` gives every
worker a disjoint set of shards.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic

import torch
from torch.utils.data import IterableDataset, default_collate, get_worker_info
from torchdata.nodes import BaseNode

from s3pipes._types import Sample, StateDict, T, U
from s3pipes.checkpoint import CheckpointStore
from s3pipes.errors import ConfigError
from s3pipes.index import is_own_file, no_objects
from s3pipes.preview import PipeStats, Preview, describe_pipe, step_label
from s3pipes.stages.base import SKIPPED_KEY, SOURCE_KEY, OnError, check_on_error
from s3pipes.stages.group import GroupByKey
from s3pipes.stages.open import DEFAULT_AHEAD, DEFAULT_BLOCK_SIZE, OpenObject
from s3pipes.stages.parallel import ParallelMap
from s3pipes.stages.shards import Consumer, ShardPlan, Shards
from s3pipes.stages.shuffle import ShuffleBuffer
from s3pipes.stages.sink import CheckpointSink
from s3pipes.stages.tar import Untar
from s3pipes.stages.transform import Batch, Filter, Map
from s3pipes.store import Store
from s3pipes.writer import ConvertResult, ShardWriter, write_manifest

__all__ = ["Pipe", "current_consumer", "from_urls", "list_prefix", "sole_consumer", "webdataset"]

_Step = tuple[type, Mapping[str, Any]]


_SOLE: contextvars.ContextVar[bool] = contextvars.ContextVar("s3pipes_sole_consumer", default=False)


@contextlib.contextmanager
def sole_consumer() -> Iterator[None]:
    """Inside it, pipes built in this thread take every shard: consumer 0 of 1, whatever the rank.

    For work that is already split (a conversion's unit on an executor), where a launcher's
    ``RANK`` / ``WORLD_SIZE`` would otherwise make each pipe keep only its share.
    """
    token = _SOLE.set(True)
    try:
        yield
    finally:
        _SOLE.reset(token)


def current_consumer() -> Consumer:
    """The (rank, world size, worker, workers) this code runs as.

    Rank: ``torch.distributed`` when initialised, else ``RANK`` / ``WORLD_SIZE``, else 0 of 1.
    Worker: the DataLoader worker info, else 0 of 1. Inside :func:`sole_consumer`: 0 of 1, 0 of 1.
    """
    if _SOLE.get():
        return Consumer(rank=0, world_size=1, worker=0, num_workers=1)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return Consumer(rank=rank, world_size=world, worker=worker, num_workers=workers)


class Pipe(IterableDataset[T], Generic[T]):
    """A chain of stages over a shard plan. Build one with :func:`list_prefix` or :func:`from_urls`.

    Iteration order is deterministic given the seeds, the epoch (:meth:`set_epoch`) and
    the consumer. ``state_dict()`` after any item, loaded into a fresh Pipe built the same
    way, yields exactly the remaining items, in the same order.

    Example:
        >>> import io, webdataset as wds
        >>> buffer = io.BytesIO()
        >>> with wds.TarWriter(buffer) as tar:
        ...     for i in range(2):
        ...         _ = tar.write({"__key__": f"k{i}", "txt": f"sample {i}".encode()})
        >>> store = Store()
        >>> store.write_bytes("memory://doc-pipe/shard-0.tar", buffer.getvalue())
        >>> pipe = from_urls("memory://doc-pipe/shard-0.tar", store=store).open_object().untar().group_by_key()
        >>> [(sample["__key__"], sample["txt"]) for sample in pipe]
        [('k0', b'sample 0'), ('k1', b'sample 1')]
    """

    STATE_VERSION = 1
    SPEC_KEY = "spec"  # the state's spec_fingerprint()

    def __init__(self, plan: ShardPlan, store: Store, steps: tuple[_Step, ...] = (), *, epoch: int = 0) -> None:
        super().__init__()
        self._plan, self._store, self._steps, self._epoch = plan, store, steps, epoch
        self._pending: StateDict | None = None
        self._live: _PipeIterator[T] | None = None
        # a loaded state set aside for another epoch: the next pass's checkpoint() steps go on from it
        self._carried: StateDict | None = None
        self._epoch_chosen = False  # set_epoch was called since the last pass began
        self._fingerprint: tuple[str | None] | None = None  # spec_fingerprint(), once computed

    # -- planning (before any stage) -------------------------------------------------------

    @property
    def urls(self) -> tuple[str, ...]:
        """All shard URLs, sorted (before shuffling and splitting)."""
        return self._plan.urls

    def shuffle_shards(self, seed: int = 0) -> Pipe[T]:
        """Shuffle the shard order each epoch: a pure function of ``(seed, epoch)``.

        Example:
            >>> pipe = from_urls("memory://doc-shuffle-shards/{0..4}.tar", store=Store()).shuffle_shards(seed=1)
            >>> [url[-5:] for url in pipe]
            ['3.tar', '4.tar', '2.tar', '1.tar', '0.tar']
        """
        if self._steps:
            raise ValueError("shuffle_shards() must come before open_object(): it orders shards, not samples")
        return Pipe(self._plan.shuffled(seed), self._store, (), epoch=self._epoch)

    # -- stages ----------------------------------------------------------------------------

    def _then(self, cls: type, **kwargs: Any) -> Pipe[Any]:
        if self._steps and self._steps[-1][0] is CheckpointSink:
            raise ValueError(f"checkpoint() must be the last stage: add .{_method_name(cls)}() before it")
        return Pipe(self._plan, self._store, (*self._steps, (cls, kwargs)), epoch=self._epoch)

    def open_object(self, *, block_size: int = DEFAULT_BLOCK_SIZE, ahead: int = DEFAULT_AHEAD) -> Pipe[Any]:
        """URL -> a lazily opened stream (``.url``, ``.read()``, ``.seek()``).

        Reads come in blocks of ``block_size`` bytes, ``ahead`` of them fetched ahead of the one
        being read: memory is about ``(ahead + 1) * block_size`` per stream being read (a store
        far away, with more time to a first byte, may want more ahead). A block is a ranged GET;
        before ``untar``, which reads each stream whole, a plain-http endpoint sends a stream's
        blocks in one GET.

        Example:
            >>> store = Store()
            >>> store.write_bytes("memory://doc-open-object/a.txt", b"hello")
            >>> [(f.url, f.read()) for f in from_urls("memory://doc-open-object/a.txt", store=store).open_object()]
            [('memory://doc-open-object/a.txt', b'hello')]
        """
        return self._then(OpenObject, block_size=block_size, ahead=ahead)

    def untar(self, *, on_error: OnError = "raise") -> Pipe[Any]:
        """Stream -> tar members (``.url``, ``.name``, ``.data``, ``.offset``), streaming.

        ``on_error="skip"``: a corrupt or truncated shard's remainder is skipped, counted and
        recorded (see :meth:`skipped`); the default raises ``CorruptShard``.

        Example:
            >>> import io, webdataset as wds
            >>> buffer = io.BytesIO()
            >>> with wds.TarWriter(buffer) as tar:
            ...     _ = tar.write({"__key__": "k0", "txt": b"a cat", "cls": b"3"})
            >>> Store().write_bytes("memory://doc-untar/shard-0.tar", buffer.getvalue())
            >>> pipe = from_urls("memory://doc-untar/shard-0.tar", store=Store()).open_object().untar()
            >>> [(member.name, member.data) for member in pipe]
            [('k0.cls', b'3'), ('k0.txt', b'a cat')]
        """
        return self._then(Untar) if check_on_error(on_error) == "raise" else self._then(Untar, on_error=on_error)

    def group_by_key(self, *, on_error: OnError = "raise") -> Pipe[Sample]:
        """Members -> sample dicts ``{"__key__", "__url__", <field>: bytes}``.

        A field repeated within one sample raises ``DuplicateField`` naming the shard, member and
        byte offset; ``on_error="skip"`` drops that sample instead, counting and recording it
        (see :meth:`skipped`).

        Example:
            >>> import io, webdataset as wds
            >>> buffer = io.BytesIO()
            >>> with wds.TarWriter(buffer) as tar:
            ...     _ = tar.write({"__key__": "k0", "txt": b"a cat", "cls": b"3"})
            >>> Store().write_bytes("memory://doc-group/shard-0.tar", buffer.getvalue())
            >>> pipe = from_urls("memory://doc-group/shard-0.tar", store=Store()).open_object().untar().group_by_key()
            >>> next(iter(pipe))
            {'__key__': 'k0', '__url__': 'memory://doc-group/shard-0.tar', 'cls': b'3', 'txt': b'a cat'}
        """
        if check_on_error(on_error) == "raise":
            return self._then(GroupByKey)
        return self._then(GroupByKey, on_error=on_error)

    def decode(
        self, image: str = "pil", *, workers: int = 0, on_error: OnError = "raise", **options: Any
    ) -> Pipe[Sample]:
        """Decode fields by extension (:class:`s3pipes.decode.Decoder` has the choices).

        ``workers`` > 0 decodes on that many threads (Pillow releases the GIL), in order.
        ``on_error="skip"`` drops a sample with a field that cannot be decoded, counting and
        recording it (see :meth:`skipped`); the default raises ``DecodeError``, naming the
        shard, member and key. The sample it raised for counts as taken: iterating on, or
        resuming from the state taken after the error, goes on with the next sample (a corrupt
        shard, which cannot be read past, raises again instead).

        Example:
            >>> import io, webdataset as wds
            >>> buffer = io.BytesIO()
            >>> with wds.TarWriter(buffer) as tar:
            ...     _ = tar.write({"__key__": "k0", "txt": b"a cat", "cls": b"3", "json": b'{"w": 2}'})
            >>> Store().write_bytes("memory://doc-decode/shard-0.tar", buffer.getvalue())
            >>> pipe = from_urls("memory://doc-decode/shard-0.tar", store=Store()).open_object().untar().group_by_key()
            >>> sample = next(iter(pipe.decode()))
            >>> sample["cls"], sample["txt"], sample["json"]
            (3, 'a cat', {'w': 2})
        """
        from s3pipes.decode import Decoder

        decoder: Callable[[Any], Sample] = Decoder(image=image, **options)
        if check_on_error(on_error) == "raise":
            return self.map(decoder, workers=workers)
        if workers:
            return self._then(ParallelMap, fn=decoder, workers=workers, on_error=on_error)
        return self._then(Map, fn=decoder, on_error=on_error)

    def map(self, fn: Callable[[T], U], *, workers: int = 0) -> Pipe[U]:
        """Apply ``fn`` to every item; on ``workers`` threads, in order, if > 0.

        Example:
            >>> pipe = from_urls("memory://doc-pipe-map/{0..2}.txt", store=Store())
            >>> list(pipe.map(lambda url: url.rsplit("/", 1)[1]))
            ['0.txt', '1.txt', '2.txt']
        """
        if workers:
            return self._then(ParallelMap, fn=fn, workers=workers)
        return self._then(Map, fn=fn)

    def filter(self, predicate: Callable[[T], bool]) -> Pipe[T]:
        """Keep the items for which ``predicate`` is true.

        Example:
            >>> pipe = from_urls("memory://doc-filter/{0..3}.txt", store=Store())
            >>> list(pipe.filter(lambda url: url.endswith(("1.txt", "3.txt"))))
            ['memory://doc-filter/1.txt', 'memory://doc-filter/3.txt']
        """
        return self._then(Filter, predicate=predicate)

    def shuffle(self, buffer_size: int, *, seed: int = 0) -> Pipe[T]:
        """Shuffle items through a buffer; resumable (the state holds the buffer).

        Example:
            >>> pipe = from_urls("memory://doc-shuffle/{0..5}", store=Store()).map(lambda url: int(url[-1]))
            >>> list(pipe.shuffle(buffer_size=3, seed=5))
            [1, 0, 4, 3, 5, 2]
        """
        return self._then(ShuffleBuffer, buffer_size=buffer_size, seed=seed)

    def batch(
        self,
        batch_size: int,
        *,
        collate: Callable[[list[T]], Any] | None = default_collate,
        drop_last: bool = False,
    ) -> Pipe[Any]:
        """Group ``batch_size`` items and collate them (``collate=None`` gives lists).

        Example:
            >>> pipe = from_urls("memory://doc-batch/{0..4}", store=Store()).map(lambda url: int(url[-1]))
            >>> list(pipe.batch(2))
            [tensor([0, 1]), tensor([2, 3]), tensor([4])]
            >>> list(pipe.batch(2, collate=None, drop_last=True))
            [[0, 1], [2, 3]]
        """
        return self._then(Batch, batch_size=batch_size, collate=collate, drop_last=drop_last)

    def checkpoint(
        self, store: CheckpointStore, *, every: int, state: Callable[[], Mapping[str, Any]] | None = None
    ) -> Pipe[T]:
        """Pass-through last stage: save ``state()`` and this pipe's position every ``every`` items and at epoch end.

        Each save is ``store.save({**state(), "data": <this pipe's state_dict()>}, step=<items so far>)``; resume
        with ``pipe.load_state_dict(store.load()["data"])``. It saves from the iterating process, never from a
        DataLoader worker (use ``num_workers=0``). :class:`~s3pipes.stages.sink.CheckpointSink` has the details.

        Example:
            >>> ckpt = CheckpointStore("memory://doc-pipe-checkpoint/run", store=Store())
            >>> pipe = from_urls("memory://doc-pipe-checkpoint/{0..4}", store=Store()).map(lambda url: int(url[-1]))
            >>> list(pipe.checkpoint(ckpt, every=2, state=lambda: {"lr": 0.1}))
            [0, 1, 2, 3, 4]
            >>> ckpt.steps(), ckpt.load()["lr"]
            ([2, 4, 5], 0.1)
        """
        return self._then(CheckpointSink, store=store, every=every, state=state)

    def write_shards(
        self,
        pattern: str,
        *,
        maxcount: int = 10_000,
        maxsize: int = 256 << 20,
        start_shard: int = 0,
        progress: bool | None = None,
    ) -> ConvertResult:
        """Write every item (a sample dict with ``__key__``) into tar shards, then their manifest; consumes the pipe.

        Shards are ``pattern.format(shard=i)`` from ``start_shard``, each closed at ``maxcount``
        samples or once ``maxsize`` bytes are reached, streamed to the store and published
        whole (:class:`~s3pipes.writer.ShardWriter`); ``shards.s3pipes.json`` next to them is
        written last. It runs here, in this process: :func:`s3pipes.convert` splits a
        conversion over an executor and resumes a killed one.

        Raises:
            ConfigError: under a distributed launcher (``WORLD_SIZE`` > 1): every rank would
                write its share under the same names.

        Example:
            >>> pipe = from_urls("memory://doc-write-shards/in/{0..2}", store=Store())
            >>> samples = pipe.map(lambda url: {"__key__": url[-1], "txt": url})
            >>> result = samples.write_shards("memory://doc-write-shards/out/{shard}.tar", maxcount=2, progress=False)
            >>> [(shard.name, shard.samples) for shard in result.shards], result.manifest
            ([('0.tar', 2), ('1.tar', 1)], 'memory://doc-write-shards/out/shards.s3pipes.json')
        """
        consumer = current_consumer()
        if consumer.world_size > 1:
            raise ConfigError(
                f"write_shards({pattern!r}) runs on rank {consumer.rank} of {consumer.world_size} (RANK/WORLD_SIZE "
                "are set): each rank would write its share under the same shard names. Run it in one process, "
                "or use s3pipes.convert(), which splits the work over an executor itself"
            )
        started = time.perf_counter()
        writer = ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, store=self._store, start_shard=start_shard)
        items: Iterator[Any] = iter(self)
        if progress or (progress is None and sys.stderr.isatty()):
            from tqdm import tqdm

            items = iter(tqdm(items, desc="samples", unit="sample"))
        shards = writer.write_all(items)
        manifest = write_manifest(self._store, pattern, shards)
        return ConvertResult(shards, [], 0, time.perf_counter() - started, manifest)

    # -- looking at it ---------------------------------------------------------------------

    def peek(self, n: int = 5) -> Preview[T]:
        """The first ``n`` items, from a fresh build iterated here (no DataLoader), shown as a table.

        This pipe's own position, loaded state and live iterator are untouched; the stages
        opened for the preview are shut down before it returns. It reads as one consumer
        (every shard, in this epoch's order), from the start of the epoch, and leaves out
        ``.checkpoint()`` (nothing is saved). :class:`~s3pipes.preview.Preview` has the display.

        Raises:
            ValueError: ``n`` is not a non-negative int.

        Example:
            >>> import io, webdataset as wds
            >>> buffer = io.BytesIO()
            >>> with wds.TarWriter(buffer) as tar:
            ...     for i in range(3):
            ...         _ = tar.write({"__key__": f"k{i}", "cls": str(i).encode(), "txt": b"a cat"})
            >>> store = Store()
            >>> store.write_bytes("memory://doc-peek/shard-0.tar", buffer.getvalue())
            >>> pipe = from_urls("memory://doc-peek/shard-0.tar", store=store).open_object().untar().group_by_key()
            >>> pipe.peek(2)
            Preview of 2 items
            #  key  cls       txt
            0  k0   1 B b'0'  5 B b'a cat'
            1  k1   1 B b'1'  5 B b'a cat'
            >>> pipe.decode().peek(1)[0]["cls"]
            0
        """
        steps = tuple(step for step in self._steps if step[0] is not CheckpointSink)
        return Preview.from_node(Pipe(self._plan, self._store, steps, epoch=self._epoch)._build(Consumer()), n)

    def stats(self) -> PipeStats:
        """Per-stage counts of this process's latest pass: items (and bytes, where moved), rates, wall time.

        Read it during or after iterating the pipe here, directly or through a DataLoader with
        ``num_workers=0``. Counts are per process and per pass: with DataLoader workers each worker
        iterates its own copy and nothing is collected (this reports ``"not started"``). Counting is
        always on: an integer increment per item per stage, about 0.5-1% of a raw streaming pass over
        small samples. :class:`~s3pipes.preview.PipeStats` has the fields, ``to_dict()`` and the table.

        Example:
            >>> store = Store()
            >>> for i in range(2):
            ...     store.write_bytes(f"memory://doc-stats/{i}.txt", b"")
            >>> pipe = list_prefix("memory://doc-stats/", store=store).map(str.upper)
            >>> pipe.stats().status, len(list(pipe))
            ('not started', 2)
            >>> [(s["stage"], s["items"]) for s in pipe.stats().to_dict()["stages"]]
            [('shards', 2), ('map', 2)]
        """
        labels = ["shards", *(step_label(_method_name(cls), kwargs) for cls, kwargs in self._steps)]
        live = self._live
        if live is None:
            return PipeStats.collect(labels, None, 0.0, None)
        return PipeStats.collect(labels, live.node, live.started, live.finished)

    def skipped(self) -> dict[str, Any]:
        """What ``on_error="skip"`` stages skipped up to this pipe's position (:meth:`state_dict`'s).

        Returns ``{"count": <total>, "by_stage": {<stage>: <count, if any>}, "entries": [...]}``; each
        entry is ``{"stage", "url", "member", "key", "offset", "error"}`` (``key``: the sample's
        ``__key__`` for a decode error; ``member`` and ``offset``: the tar member and byte offset
        of a corrupt shard). Each stage keeps its last 1000 entries; the counts are complete.
        It is part of the state, so a resumed pipe reports the skips before its checkpoint and
        does not count them again. Per consumer: DataLoader workers each keep their own.

        Example:
            >>> pipe = from_urls("memory://doc-skipped/0.tar", store=Store()).open_object().untar(on_error="skip")
            >>> pipe.skipped()
            {'count': 0, 'by_stage': {}, 'entries': []}
        """
        if self._pending is None and self._live is None:
            return {"count": 0, "by_stage": {}, "entries": []}
        labels = [step_label(_method_name(cls), kwargs) for cls, kwargs in self._steps]
        states: list[StateDict] = []
        node_state: Any = self.state_dict()["node"]
        while isinstance(node_state, dict):
            states.append(node_state)
            node_state = node_state.get(SOURCE_KEY)
        states.reverse()  # source first, like labels (the Shards stage has no step)
        by_stage: dict[str, int] = {}
        entries: list[dict[str, Any]] = []
        for label, state in zip(["shards", *labels], states, strict=False):
            log = state.get(SKIPPED_KEY)
            if isinstance(log, dict) and log["count"]:
                by_stage[label] = by_stage.get(label, 0) + int(log["count"])
                entries.extend({"stage": label, **entry} for entry in log["entries"])
        return {"count": sum(by_stage.values()), "by_stage": by_stage, "entries": entries}

    # -- as data ---------------------------------------------------------------------------

    def to_spec(self) -> dict[str, Any]:
        """This pipeline as plain data; :func:`s3pipes.spec.from_spec` rebuilds it (:mod:`s3pipes.spec` has the format).

        Holds no store and no credentials, and leaves out ``.checkpoint()``.

        Raises:
            ConfigError: a stage holds a lambda, a local function or another callable without an import path.

        Example:
            >>> pipe = from_urls("memory://doc-to-spec/{0..1}.tar", store=Store()).open_object().untar()
            >>> spec = pipe.to_spec()
            >>> spec["source"]
            {'urls': ['memory://doc-to-spec/0.tar', 'memory://doc-to-spec/1.tar']}
            >>> spec["stages"]
            [{'stage': 'open_object', 'block_size': 8388608, 'ahead': 4}, {'stage': 'untar'}]
        """
        from s3pipes.spec import to_spec

        return to_spec(self)

    def to_yaml(self) -> str:
        """:meth:`to_spec` as YAML text.

        Example:
            >>> print(from_urls("memory://doc-to-yaml/0.tar", store=Store()).open_object().to_yaml(), end="")
            version: 1
            source:
              urls:
              - memory://doc-to-yaml/0.tar
            shuffle_shards: null
            stages:
            - stage: open_object
              block_size: 8388608
              ahead: 4
        """
        from s3pipes.spec import to_yaml

        return to_yaml(self.to_spec())

    def spec_fingerprint(self) -> str | None:
        """16 hex digits naming the items this pipe yields and their order; None if it has no spec (lambdas).

        ``state_dict()`` records it, and ``load_state_dict()`` refuses a state of another fingerprint.
        Thread counts and block sizes do not change it; :mod:`s3pipes.spec` has the rule.

        Example:
            >>> urls = from_urls("memory://doc-fingerprint/{0..1}.tar", store=Store())
            >>> pipe, small_blocks = urls.open_object(), urls.open_object(block_size=1024)
            >>> len(pipe.spec_fingerprint()), pipe.spec_fingerprint() == small_blocks.spec_fingerprint()
            (16, True)
            >>> print(pipe.map(lambda stream: stream.url).spec_fingerprint())
            None
        """
        if self._fingerprint is None:
            from s3pipes.spec import spec_fingerprint, to_spec

            try:
                self._fingerprint = (spec_fingerprint(to_spec(self)),)
            except ConfigError:
                self._fingerprint = (None,)
        return self._fingerprint[0]

    # -- epochs and state ------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the shard and sample order. A loaded state of another epoch is dropped
        (a ``checkpoint()`` stage still counts its steps on from it).

        Example:
            >>> pipe = from_urls("memory://doc-set-epoch/{0..4}.tar", store=Store()).shuffle_shards(seed=1)
            >>> pipe.set_epoch(1)
            >>> [url[-5:] for url in pipe]
            ['4.tar', '3.tar', '0.tar', '1.tar', '2.tar']
        """
        self._epoch, self._epoch_chosen = int(epoch), True
        if self._pending is not None and self._pending["epoch"] != self._epoch:
            self._carried, self._pending = self._pending, None
        elif self._pending is None and self._carried is not None and self._carried["epoch"] == self._epoch:
            self._carried, self._pending = None, self._carried  # set aside, and its epoch is chosen again

    def state_dict(self) -> StateDict:
        """The position after the last item yielded (or the loaded one, before iterating; or the
        start of the epoch :meth:`set_epoch` set since).

        A state whose pass has ended has ``"ended": True``.

        Example:
            >>> pipe = from_urls("memory://doc-state-dict/{0..3}", store=Store()).map(lambda url: int(url[-1]))
            >>> items = iter(pipe)
            >>> next(items), next(items)
            (0, 1)
            >>> state = pipe.state_dict()
            >>> state["epoch"], list(items)
            (0, [2, 3])
        """
        if self._pending is not None:
            return self._pending
        if self._live is not None and self._live.epoch == self._epoch:
            return self._live.state_dict()
        consumer = current_consumer()
        return self._wrap(self._build(consumer).state_dict(), consumer, self._epoch)

    def load_state_dict(self, state: StateDict) -> None:
        """Resume from ``state`` at the next ``iter()``.

        Raises:
            ValueError: not a Pipe state dict, or one saved by a pipeline of another :meth:`spec_fingerprint`
                (a state without one, or a pipe without one, is not checked).

        Example:
            >>> def build():
            ...     return from_urls("memory://doc-load-state/{0..3}", store=Store()).map(lambda url: int(url[-1]))
            >>> pipe = build()
            >>> items = iter(pipe)
            >>> next(items)
            0
            >>> resumed = build()
            >>> resumed.load_state_dict(pipe.state_dict())
            >>> list(resumed)
            [1, 2, 3]
        """
        if state.get("version") != self.STATE_VERSION or "node" not in state:
            raise ValueError(f"not an s3pipes Pipe state dict (keys {sorted(state)})")
        saved, mine = state.get(self.SPEC_KEY), self.spec_fingerprint()
        if saved is not None and mine is not None and saved != mine:
            raise ValueError(
                f"this state belongs to another pipeline: it was saved by pipeline {saved}, this is {mine}; "
                "the shard list, the shard seed or the stages differ (pipe.to_spec() shows this one). Resume "
                "with the pipeline that saved it, e.g. s3pipes.from_spec() of the spec saved with the run"
            )
        if self._epoch_chosen and _passed(state, self._epoch):
            # StatefulDataLoader (num_workers=0) loads the dataset's state at iter(), after the
            # training loop's set_epoch(next epoch): a state whose epoch has ended has nothing
            # left for this pipe, which keeps the epoch chosen (and its checkpoint() steps go on).
            # Without a set_epoch since the last pass, a load goes back to that state (a rollback).
            self._carried, self._pending = dict(state), None
            return
        self._pending = dict(state)
        self._epoch = int(state["epoch"])

    def _wrap(self, node_state: StateDict, consumer: Consumer, epoch: int, *, ended: bool = False) -> StateDict:
        state = {
            "version": self.STATE_VERSION,
            "epoch": epoch,
            "consumer": [consumer.rank, consumer.world_size, consumer.worker, consumer.num_workers],
            "node": node_state,
            self.SPEC_KEY: self.spec_fingerprint(),
        }
        if ended:
            state["ended"] = True  # the pass is over: see _passed
        return state

    # -- running ---------------------------------------------------------------------------

    def _build(self, consumer: Consumer) -> BaseNode[Any]:
        node: BaseNode[Any] = Shards(self._plan, epoch=self._epoch, consumer=consumer)
        for cls, kwargs in self._steps:
            if cls is OpenObject:
                node = OpenObject(node, self._store, **kwargs)
            elif cls is ShuffleBuffer:
                node = ShuffleBuffer(node, **kwargs, epoch=self._epoch, stream=consumer.index)
            elif cls is CheckpointSink:  # saves the pipe-level state; its step goes on from the last pass
                last = self._last_pass_state()
                wrap = functools.partial(self._wrap, consumer=consumer, epoch=self._epoch)
                node = CheckpointSink(node, **kwargs, wrap=wrap, start=CheckpointSink.step_of(last))
            else:
                node = cls(node, **kwargs)
        return node

    def _last_pass_state(self) -> StateDict | None:
        """The node state a new pass continues ``checkpoint()``'s steps from: a state set aside
        for another epoch, else the last pass's (None: none)."""
        if self._carried is not None:
            return self._carried["node"]  # type: ignore[no-any-return]
        return self._live.state_dict()["node"] if self._live is not None else None

    def __iter__(self) -> Iterator[T]:
        consumer = current_consumer()
        iterator: _PipeIterator[T] = _PipeIterator(self, consumer)
        if self._pending is not None:
            iterator.load_state_dict(self._pending)
            self._pending = None
        iterator.set_aside = self._carried  # StatefulDataLoader then loads it into the iterator: ignored too
        self._live, self._carried, self._epoch_chosen = iterator, None, False
        return iterator

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_live"] = None  # open streams stay with their process
        return state

    def __repr__(self) -> str:
        steps = [(_method_name(cls), kwargs) for cls, kwargs in self._steps]
        return describe_pipe(self._plan, self._store, steps, epoch=self._epoch)


_METHOD_NAMES: dict[type, str] = {
    OpenObject: "open_object",
    Untar: "untar",
    GroupByKey: "group_by_key",
    ShuffleBuffer: "shuffle",
    ParallelMap: "map",
    CheckpointSink: "checkpoint",
}


def _method_name(cls: type) -> str:
    return _METHOD_NAMES.get(cls, cls.__name__.lower())


class _PipeIterator(Iterator[T], Generic[T]):
    """One pass over a Pipe for one consumer; Stateful for torchdata's StatefulDataLoader."""

    def __init__(self, pipe: Pipe[T], consumer: Consumer) -> None:
        self._pipe, self._consumer = pipe, consumer
        self.started = time.perf_counter()  # the pass's wall time, for Pipe.stats()
        self.finished: float | None = None
        self.epoch = pipe._epoch
        self.node = pipe._build(consumer)
        self.node.reset()
        self._applied: StateDict | None = None  # the state loaded, until an item is taken
        self.set_aside: StateDict | None = None  # a state the pipe set aside for an earlier epoch
        self._ended = False  # the pass ran out (or the loaded state's had)

    def __next__(self) -> T:
        self._applied = None
        try:
            return next(self.node)  # type: ignore[no-any-return]
        except StopIteration:
            if self.finished is None:
                self.finished = time.perf_counter()
            self._ended = True
            raise

    def state_dict(self) -> StateDict:
        return self._pipe._wrap(self.node.state_dict(), self._consumer, self.epoch, ended=self._ended)

    def load_state_dict(self, state: StateDict) -> None:
        saved = Consumer(*state["consumer"])
        if saved != self._consumer:
            raise ValueError(
                f"this state was saved by {saved} but is being loaded by {self._consumer}: "
                "resume with the same world size and number of DataLoader workers"
            )
        if state == self._applied or (self.set_aside is not None and state == self.set_aside):
            return  # StatefulDataLoader restores the dataset and then its iterator: one reopen is enough
        self.node = self._pipe._build(self._consumer)
        self.node.reset(state["node"])
        self.started, self.finished = time.perf_counter(), None
        self.epoch, self._ended = int(state["epoch"]), bool(state.get("ended"))
        self._applied = state


def _passed(state: StateDict, epoch: int) -> bool:
    """Whether ``state`` is of a pass that ended in an epoch before ``epoch``."""
    return bool(state.get("ended")) and int(state["epoch"]) < epoch


def _store(store: Store | None, storage_options: Mapping[str, Any] | None) -> Store:
    if store is not None and storage_options is not None:
        raise ValueError("pass either store= or storage_options=, not both")
    return store if store is not None else Store.from_env(storage_options)


def list_prefix(
    prefix: str, *, suffix: str = "", store: Store | None = None, storage_options: Mapping[str, Any] | None = None
) -> Pipe[str]:
    """A Pipe over every object under ``prefix`` ending in ``suffix``, in sorted order.

    The listing happens once, here, so every worker and rank splits the same list.

    Example:
        >>> store = Store()
        >>> for i in range(3):
        ...     store.write_bytes(f"memory://doc-lp/shard-{i}.tar", b"")
        >>> list_prefix("memory://doc-lp/", suffix=".tar", store=store).urls[-1]
        'memory://doc-lp/shard-2.tar'
    """
    store = _store(store, storage_options)
    urls = [url for url in store.list(prefix, suffix=suffix) if not is_own_file(url)]
    if not urls:
        raise no_objects(store, prefix, suffix)
    return Pipe(ShardPlan(tuple(urls)), store)


def from_urls(
    urls: str | Sequence[str], *, store: Store | None = None, storage_options: Mapping[str, Any] | None = None
) -> Pipe[str]:
    """A Pipe over explicit URLs; brace patterns expand (``shard-{000..015}.tar``).

    Example:
        >>> from_urls("memory://b/shard-{00..02}.tar", store=Store()).urls
        ('memory://b/shard-00.tar', 'memory://b/shard-01.tar', 'memory://b/shard-02.tar')
    """
    from braceexpand import braceexpand

    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = tuple(url for pattern in patterns for url in braceexpand(pattern))
    if not expanded:
        raise ValueError("from_urls() needs at least one URL")
    return Pipe(ShardPlan(expanded), _store(store, storage_options))


def webdataset(
    source: str | Sequence[str],
    *,
    shuffle_seed: int | None = None,
    suffix: str = ".tar",
    store: Store | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_error: OnError = "raise",
) -> Pipe[Sample]:
    """List (a prefix ending in "/") or expand (URLs/patterns), shuffle shards, open, untar, group.

    ``on_error="skip"`` skips (and records, see :meth:`Pipe.skipped`) the rest of a corrupt or
    truncated shard instead of raising ``CorruptShard``, and a sample with a repeated field instead
    of raising ``DuplicateField``; store errors always raise.

    Example::

        pipe = s3pipes.webdataset("s3://bucket/train/", shuffle_seed=0).decode("torch")
    """
    if isinstance(source, str) and source.endswith("/"):
        pipe = list_prefix(source, suffix=suffix, store=store, storage_options=storage_options)
    else:
        pipe = from_urls(source, store=store, storage_options=storage_options)
    if shuffle_seed is not None:
        pipe = pipe.shuffle_shards(shuffle_seed)
    return pipe.open_object().untar(on_error=on_error).group_by_key(on_error=on_error)
