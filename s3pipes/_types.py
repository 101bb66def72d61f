"""Shared type aliases."""

from __future__ import annotations

from typing import Any, TypeVar

Sample = dict[str, Any]
"""One training example: ``{"__key__": str, "__url__": str, <extension>: value, ...}``."""

StateDict = dict[str, Any]
"""A stage's resumable position: small, nested under ``"source"``, JSON-able where possible."""

T = TypeVar("T")
U = TypeVar("U")
