"""An item's class as its metadata states it (for the check's and the backfill curve's labelled figures)."""

from __future__ import annotations

import re
from typing import Any

_INT = re.compile(r"-?[0-9]{1,18}")  # ASCII digits only, and within int64 (labels become int64 arrays)
_INT64 = 2**63


def label_of(metadata: Any, key: str = "label") -> int | None:
    """The integer class under ``key`` of an item's metadata (an int, or a string of digits), or None."""
    if isinstance(metadata, dict):
        v = metadata.get(key)
        if isinstance(v, bool):
            return None
        if isinstance(v, int):
            return v if -_INT64 < v < _INT64 else None
        if isinstance(v, str) and _INT.fullmatch(v.strip()):
            return int(v)
    return None
