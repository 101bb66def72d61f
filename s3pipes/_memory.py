"""Buffers that bodies are received into, reused from one transfer to the next."""

from __future__ import annotations

import mmap

__all__ = ["anonymous_buffer"]


def anonymous_buffer(size: int) -> mmap.mmap:
    """``size`` bytes of fresh memory for receiving into, private to this process.

    ``MAP_PRIVATE``: ``mmap.mmap(-1, n)`` is shared by default, so a buffer kept across a fork
    (a DataLoader worker) would be written by parent and child alike.
    """
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
