"""The stage contract: torchdata.nodes' ``BaseNode`` (``reset`` / ``next`` / ``get_state``).

A stage is an iterator with an explicit, small state. ``reset(state)`` puts it (and,
through ``SOURCE_KEY``, its source) back at that position; ``get_state()`` describes the
position *after the last item it returned*, so that ``reset(get_state())`` on a fresh
copy continues with exactly the next item.

Every stage also counts what it returns since its last ``reset`` (``items_out``; the
stages that move bytes, ``OpenObject`` and ``Untar``, also ``bytes_out``) for
``Pipe.stats()``: an integer increment or two per item, never part of the state.
"""

from __future__ import annotations

from typing import Any, Generic

from torchdata.nodes import BaseNode

from s3pipes._types import StateDict, T

__all__ = ["SOURCE_KEY", "Stage", "ThroughStage"]

SOURCE_KEY = "source"


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
