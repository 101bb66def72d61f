"""Shared harnesses every stateful stage passes (STYLE rule 3)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from s3pipes import Pipe


def comparable(item: Any) -> Any:
    """Items made comparable with == (tensors and arrays to nested lists)."""
    if hasattr(item, "tolist"):
        return item.tolist()
    if isinstance(item, dict):
        return {k: comparable(v) for k, v in item.items()}
    if isinstance(item, (list, tuple)):
        return [comparable(v) for v in item]
    return item


def run(pipe: Pipe[Any]) -> list[Any]:
    return [comparable(item) for item in pipe]


def assert_resumes(make: Callable[[], Pipe[Any]], *, epochs: Sequence[int] = (0, 1), json_state: bool = True) -> None:
    """Checkpoint after every item of each epoch; a fresh pipe loaded with it yields exactly the rest."""
    for epoch in epochs:
        pipe = make()
        pipe.set_epoch(epoch)
        expected = run(pipe)
        assert expected, "the harness needs a non-empty epoch"
        pipe = make()
        pipe.set_epoch(epoch)
        iterator = iter(pipe)
        for k in range(len(expected) + 1):
            state = pipe.state_dict()
            if json_state:
                state = json.loads(json.dumps(state))
            resumed = make()
            resumed.load_state_dict(state)
            rest = run(resumed)
            assert rest == expected[k:], (
                f"epoch {epoch}: resume after {k} items gave {len(rest)} items, wanted {len(expected) - k}"
            )
            if k < len(expected):
                assert comparable(next(iterator)) == expected[k]
        # An end-of-epoch state followed by the next epoch starts that epoch fresh.
        assert list(iterator) == []  # the pass sees its end, as a for loop or a DataLoader does
        ended = pipe.state_dict()
        assert ended.get("ended") is True
        resumed = make()
        resumed.load_state_dict(ended)
        resumed.set_epoch(epoch + 1)
        fresh = make()
        fresh.set_epoch(epoch + 1)
        following = run(fresh)
        assert run(resumed) == following
        # So does the same state loaded after set_epoch (StatefulDataLoader with num_workers=0
        # loads the dataset's state at iter(), after the training loop's set_epoch) ...
        late = make()
        late.set_epoch(epoch + 1)
        late.load_state_dict(ended)
        assert run(late) == following, "an ended state loaded after set_epoch(next) must not replay its epoch"
        # ... and the state taken after set_epoch(next), before iterating: it is that epoch's start.
        pipe.set_epoch(epoch + 1)
        resumed = make()
        resumed.load_state_dict(pipe.state_dict())
        assert run(resumed) == following, "the state after set_epoch(next) must be the start of that epoch"


def assert_disjoint_cover(parts: Sequence[Sequence[Any]], everything: Sequence[Any]) -> None:
    """The parts together hold every item exactly once."""
    joined = [item for part in parts for item in part]
    assert sorted(map(repr, joined)) == sorted(map(repr, everything)), "lost or duplicated items"
