"""ParallelMap: an ordered map on a thread pool, for work that releases the GIL (image decoding).

torchdata 0.11's ``ParallelMapper`` does this too, but its ``reset`` can leave the old
reader thread running and consuming source items (pytorch/data PR #1482, fixed after
0.11); a resumable pipeline cannot afford that, so this stage owns its threads outright.

Order is the source's. The position after an item is the source state recorded just
before the *next* item was pulled, so in-flight work is simply redone on resume. An item
leaves the in-flight queue only once the queue is refilled behind it, so a source error
while refilling loses nothing: the item is returned by the next ``next`` (or redone from
the state). An item for which ``fn`` raised is done with, as in ``Map``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic

from torchdata.nodes import BaseNode

from s3pipes._types import StateDict, T, U
from s3pipes.errors import DataError
from s3pipes.stages.base import SOURCE_KEY, OnError, SkipLog, Stage, check_on_error
from s3pipes.stages.group import locate_from

__all__ = ["ParallelMap"]


class ParallelMap(Stage[U], Generic[T, U]):
    """Applies ``fn`` on ``workers`` threads, ``2 * workers`` items in flight, in order.

    Args:
        source: the items.
        fn: the function; it must be thread-safe.
        workers: threads (>= 1).
        on_error: ``"skip"`` drops an item whose ``fn`` raises a ``DataError`` and records it in
            ``skips`` (kept in the state), as :class:`~s3pipes.stages.transform.Map` does.
    """

    def __init__(self, source: BaseNode[T], fn: Callable[[T], U], *, workers: int, on_error: OnError = "raise") -> None:
        super().__init__()
        if workers < 1:
            raise ValueError(f"{workers=} must be at least 1")
        self.source, self.fn, self.workers, self.on_error = source, fn, workers, check_on_error(on_error)
        self._pool: ThreadPoolExecutor | None = None
        self.skips = SkipLog()

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.shutdown()
        self.source.reset(initial_state[SOURCE_KEY] if initial_state is not None else None)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="s3pipes-map")
        # (source state before the item was pulled, the work) for each item in flight
        self._in_flight: deque[tuple[StateDict, Future[U]]] = deque()
        self._exhausted = False
        self.skips = SkipLog.of(initial_state)

    def _fill(self, extra: int = 0) -> None:
        if self._pool is None:
            return
        while not self._exhausted and len(self._in_flight) < 2 * self.workers + extra:
            before = self.source.state_dict()
            try:
                item = next(self.source)
            except StopIteration:
                self._exhausted = True
                return
            self._in_flight.append((before, self._pool.submit(self.fn, item)))

    def next(self) -> U:
        while True:
            self._fill()
            if not self._in_flight:
                self.shutdown()  # the epoch is over: no thread outlives it
                raise StopIteration
            _, future = self._in_flight[0]
            try:
                result = future.result()
            except Exception as exc:  # (a KeyboardInterrupt while waiting leaves the item in place)
                self._in_flight.popleft()  # the item is done with (as in Map): raised, or skipped
                if not isinstance(exc, DataError):
                    raise
                locate_from(self.source, exc)  # a DecodeError: add the member and offset
                if self.on_error == "raise":
                    raise
                self.skips.record(exc)
                continue
            self._fill(extra=1)  # keep the workers busy while this result is used
            self._in_flight.popleft()
            self.items_out += 1
            return result

    def get_state(self) -> StateDict:
        state = {SOURCE_KEY: self._in_flight[0][0] if self._in_flight else self.source.state_dict()}
        return self.skips.save_into(state, self.on_error)

    def shutdown(self) -> None:
        """Stop the threads (pending work is dropped). Idempotent."""
        if self._pool is not None:
            for _, future in getattr(self, "_in_flight", ()):
                future.cancel()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
