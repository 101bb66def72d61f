"""The stage contract: torchdata.nodes' ``BaseNode`` (``reset`` / ``next`` / ``get_state``).

A stage is an iterator with an explicit, small state. ``reset(state)`` puts it (and,
through ``SOURCE_KEY``, its source) back at that position; ``get_state()`` describes the
position *after the last item it returned*, so that ``reset(get_state())`` on a fresh
copy continues with exactly the next item.

Every stage also counts what it returns since its last ``reset`` (``items_out``; the
stages that move bytes, ``OpenObject`` and ``Untar``, also ``bytes_out``) for
``Pipe.stats()``: an integer increment or two per item, never part of the state.

Stages that take ``on_error="skip"`` (``Untar``, the decode map) keep a :class:`SkipLog`
of what they skipped: it IS part of their state (under ``SKIPPED_KEY``), so a resumed
pipe still reports the skips before its checkpoint and does not count them again.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Generic, Literal

from torchdata.nodes import BaseNode

from s3pipes._types import StateDict, T
from s3pipes.errors import DataError, DecodeError

__all__ = ["ON_ERROR_CHOICES", "SKIPPED_KEY", "SOURCE_KEY", "OnError", "SkipLog", "Stage", "ThroughStage"]

SOURCE_KEY = "source"
SKIPPED_KEY = "skipped"

OnError = Literal["raise", "skip"]
#: Valid values of ``on_error``.
ON_ERROR_CHOICES: tuple[OnError, ...] = ("raise", "skip")


def check_on_error(on_error: str) -> OnError:
    """``on_error`` itself when valid; else ValueError naming the choices."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"{on_error=} is not an error policy; choose one of {', '.join(ON_ERROR_CHOICES)}")
    return "skip" if on_error == "skip" else "raise"


class SkipLog:
    """What a stage skipped under ``on_error="skip"``: a total count and the last ``LIMIT`` entries.

    Each entry is JSON-able: ``{"url", "member", "key", "offset", "error"}`` (``key`` is the
    sample's ``__key__`` for a decode error, else ""; ``offset`` may be None). Older entries
    are dropped past ``LIMIT``; ``count`` keeps counting.
    """

    LIMIT = 1000

    def __init__(self, state: StateDict | None = None) -> None:
        state = state or {}
        self.count: int = int(state.get("count", 0))
        self.loaded = self.count  # the count restored from a state: ``count - loaded`` is this pass's
        self.entries: deque[dict[str, Any]] = deque(state.get("entries", ()), maxlen=self.LIMIT)

    def record(self, error: DataError) -> None:
        key = error.key if isinstance(error, DecodeError) else ""
        self.count += 1
        self.entries.append(
            {"url": error.url, "member": error.member, "key": key, "offset": error.offset, "error": str(error)}
        )

    @classmethod
    def of(cls, stage_state: StateDict | None) -> SkipLog:
        """The log kept in a stage's state (under ``SKIPPED_KEY``), or an empty one."""
        return cls((stage_state or {}).get(SKIPPED_KEY))

    def state(self) -> StateDict:
        return {"count": self.count, "entries": [dict(entry) for entry in self.entries]}

    def save_into(self, stage_state: StateDict, on_error: OnError) -> StateDict:
        """``stage_state`` with this log under ``SKIPPED_KEY`` when the stage skips (else as it is)."""
        if on_error == "skip":
            stage_state[SKIPPED_KEY] = self.state()
        return stage_state


class Stage(BaseNode[T], Generic[T]):
    """Every s3pipes stage: a ``torchdata.nodes.BaseNode`` (so ``Loader`` and friends take it).

    Attributes:
        items_out: items ``next()`` returned since the last ``reset`` (each stage's ``next``
            increments it). Not part of the state: a resumed stage counts from 0.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # BaseNode.__init__ is unannotated
        self.items_out = 0

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.items_out = 0


class ThroughStage(Stage[T], Generic[T]):
    """Base for stages whose position is entirely their source's (map, filter, decode)."""

    def __init__(self, source: BaseNode[Any]) -> None:
        super().__init__()
        self.source = source

    def reset(self, initial_state: StateDict | None = None) -> None:
        super().reset(initial_state)
        self.source.reset(initial_state[SOURCE_KEY] if initial_state is not None else None)

    def get_state(self) -> StateDict:
        return {SOURCE_KEY: self.source.state_dict()}
