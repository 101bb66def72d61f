"""Numbers as people read them, shared by reprs, previews and logs."""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(size: int) -> str:
    """Bytes in binary units, one decimal past the bytes.

    Example:
        >>> human_bytes(7), human_bytes(1536), human_bytes(3 << 20), human_bytes(5 << 40)
        ('7 B', '1.5 KiB', '3.0 MiB', '5.0 TiB')
    """
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"
