"""An item's class as its metadata states it (for the check's and the backfill curve's labelled figures)."""

from __future__ import annotations

from typing import Any


def label_of(metadata: Any, key: str = "label") -> int | None:
    """The integer class under ``key`` of an item's metadata (an int, or a string of digits), or None."""
    if isinstance(metadata, dict):
        v = metadata.get(key)
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v
        if isinstance(v, str) and v.strip().lstrip("-").isdigit():
            return int(v)
    return None
