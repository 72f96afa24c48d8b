"""Input checks shared by the gallery's entry points. Each raises a typed error and touches nothing."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import DimensionMismatch, InvalidEmbedding, InvalidInput, RepeatedIds
from .tables import EXTERNAL_ID_LEN, NAME_LEN

# Space names end up in file names (``<data_dir>/index/<space>.faiss``): letters, digits, ``._-``, starting
# with a letter or digit, so no separator, no ``..``, no hidden file can be formed.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

_F32 = np.dtype(np.float32)
_TINY = 1e-30


def check_name(name: object, what: str) -> str:
    """Validate a version or space name (also safe as a file name)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or len(name) > NAME_LEN:
        raise InvalidInput(
            f"{what} name {name!r} is invalid: use 1-{NAME_LEN} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


METADATA_MAX_DEPTH = 32
"""Deepest nesting of containers (dicts, lists) accepted in item metadata; a flat dict is depth 1.

Deeper metadata is refused at ingest: JSON encoders and decoders recurse (Python's stops near 1,000
levels, with a ``RecursionError``, i.e. a server error on every later read of the item)."""

METADATA_MAX_BYTES = 64 * 1024
"""Largest item metadata accepted, in bytes of its compact UTF-8 JSON form
(``json.dumps(meta, ensure_ascii=False, separators=(",", ":"))``). Metadata travels with every search hit."""


def _utf8_problem(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (a lone surrogate such as ``"\\udfff"``, which ``json.loads``
    makes of the escape ``"\\\\udfff"``), or None. ASCII, the common case, costs no encoding."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate {ascii(text[e.start])} at index {e.start}, which is not valid UTF-8"
    return None


def check_text(value: str, what: str) -> str:
    """Refuse text that cannot be stored and sent back: a NUL character, or not encodable as UTF-8."""
    if "\x00" in value:  # PostgreSQL text cannot hold NUL (and snapshots use it as a separator)
        raise InvalidInput(f"{what} {value!r} is invalid: it contains a NUL character")
    problem = _utf8_problem(value)
    if problem:
        raise InvalidInput(f"{what} {ascii(value[:80])} is invalid: it contains {problem}")
    return value


def check_external_ids(ids: Sequence[object]) -> list[str]:
    """Validate external ids and refuse repeats inside the batch."""
    out: list[str] = []
    for eid in ids:
        if not isinstance(eid, str) or not eid or len(eid) > EXTERNAL_ID_LEN:
            raise InvalidInput(
                f"external id {eid!r} is invalid: expected a non-empty str of <= {EXTERNAL_ID_LEN} chars"
            )
        out.append(check_text(eid, "external id"))
    repeats = [eid for eid, n in Counter(out).items() if n > 1]
    if repeats:
        raise RepeatedIds(repeats)
    return out


def check_metadata(meta: Any, external_id: str) -> None:
    """Metadata must be strict JSON that can be stored and sent back in any response: no NaN/inf, every
    string (keys included, at any depth) encodable as UTF-8 and free of NUL (PostgreSQL's json type refuses
    it), at most :data:`METADATA_MAX_DEPTH` levels deep and :data:`METADATA_MAX_BYTES` in size."""
    if meta is None:
        return
    who = f"metadata of {external_id!r}"
    _walk_metadata(meta, who)
    try:
        text = json.dumps(meta, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"{who} is not JSON-serialisable: {e}") from None
    size = len(text.encode("utf-8"))  # every str was checked encodable above
    if size > METADATA_MAX_BYTES:
        raise InvalidInput(f"{who} is too large: {size} bytes as JSON, at most {METADATA_MAX_BYTES}")


def _walk_metadata(meta: Any, who: str) -> None:
    """Check depth and strings without recursion, stopping early on huge metadata.

    ``floor`` is a lower bound of the JSON size (a byte per value, a string's length), so metadata is
    refused as too large as soon as it provably is, before a huge structure is walked (or serialised)
    whole. A container that contains itself is refused as too deep.
    """
    stack: list[tuple[Any, int]] = [(meta, 0)]
    floor = 0
    while stack:
        node, depth = stack.pop()
        floor += 1
        if isinstance(node, str):
            floor += len(node)
            _check_meta_str(node, who, "value")
        elif isinstance(node, dict | list | tuple):
            if depth + 1 > METADATA_MAX_DEPTH:
                raise InvalidInput(f"{who} is nested deeper than {METADATA_MAX_DEPTH} levels")
            if isinstance(node, dict):
                for key, value in node.items():
                    if isinstance(key, str):
                        floor += len(key)
                        _check_meta_str(key, who, "key")
                    stack.append((value, depth + 1))
            else:
                stack.extend((value, depth + 1) for value in node)
        if floor > METADATA_MAX_BYTES:
            raise InvalidInput(f"{who} is too large: more than {METADATA_MAX_BYTES} bytes as JSON")


def _check_meta_str(text: str, who: str, what: str) -> None:
    if "\x00" in text:  # PostgreSQL cannot store it (SQLite could: refuse on both)
        raise InvalidInput(f"{who} contains a NUL character (\\u0000), which cannot be stored")
    problem = _utf8_problem(text)
    if problem:
        raise InvalidInput(f"{who} has a {what} {ascii(text[:80])} with {problem}")


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InvalidInput(f"k must be an integer >= 1, not {k!r}")
    return int(k)


def as_unit_vectors(
    x: Any, dim: int, space: str, what: str = "embedding", labels: Sequence[str] | None = None
) -> np.ndarray:
    """Return ``x`` as C-contiguous float32 rows of unit L2 norm, shape (n, dim).

    Accepts any floating dtype (float16/32/64) of shape (n, dim), or (dim,) for one vector. Normalising on
    input (rather than refusing non-unit vectors) lets callers pass raw model outputs; the stored vectors,
    and the scores, are then cosine similarities. Every finite non-zero vector is normalised, however large
    or small its components (1e200, 1e-300: scaled by the largest one first, so no square overflows).
    Refuses, with :class:`InvalidEmbedding`: non-float data, NaN/inf, all-zero vectors, bad shapes; with :class:`DimensionMismatch`: a wrong length. ``labels`` name
    the rows in messages (external ids).
    """

    if (
        type(x) is np.ndarray
        and x.dtype is _F32
        and x.ndim == 2
        and x.shape[1] == dim
        and x.shape[0]
        and x.flags.c_contiguous
    ):
        # Fast path (search queries): as few numpy calls as possible, because right after a FAISS scan
        # the caches are cold and each numpy call costs microseconds. Finite, non-tiny float32 squared
        # norms prove every row finite and normalisable (NaN/inf propagate into them; NaN fails every
        # comparison); anything else falls through to the careful path below.
        sq = np.einsum("ij,ij->i", x, x).tolist()
        if all(_TINY < v < math.inf for v in sq):
            if len(sq) == 1:
                return x * (1.0 / math.sqrt(sq[0]))  # float32 stays float32
            return x * np.array([1.0 / math.sqrt(v) for v in sq], dtype=np.float32)[:, None]

    def row(i: int) -> str:
        return f"{what} of {labels[i]!r}" if labels is not None else f"{what} row {i}"

    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as e:  # ragged lists
        raise InvalidEmbedding(f"{what} is not a numeric array: {e}") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidEmbedding(f"{what} must be floating point, not dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InvalidEmbedding(f"{what} must have shape (n, {dim}) or ({dim},), not {np.shape(x)}")
    if arr.shape[1] != dim:
        raise DimensionMismatch(arr.shape[1], space, dim, what)
    if arr.shape[0] == 0:
        return np.empty((0, dim), dtype=np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        raise InvalidEmbedding(f"{row(int(np.argmin(finite)))} contains NaN or inf")
    # Scale each row by its largest magnitude before the norm: the squares of components around 1e155
    # (float64) overflow to inf, and those of subnormal ones underflow to 0, though every finite non-zero
    # vector has a direction. Scaled rows have max |x| = 1, so their norm lies in [1, sqrt(dim)].
    with np.errstate(over="ignore", invalid="ignore"):  # (longdouble beyond float64: inf, refused below)
        arr64 = arr.astype(np.float64)
        peak = np.abs(arr64).max(axis=1)
        zero = peak == 0
        if zero.any():
            raise InvalidEmbedding(f"{row(int(np.argmax(zero)))} has zero norm and cannot be normalised")
        scaled = arr64 / peak[:, None]
        out = scaled / np.linalg.norm(scaled, axis=1)[:, None]
    ok = np.isfinite(out).all(axis=1)
    if not ok.all():
        raise InvalidEmbedding(f"{row(int(np.argmin(ok)))} cannot be normalised in float64")
    return np.ascontiguousarray(out, dtype=np.float32)


def vectors_of(items: Sequence[Any], dim: int, space: str) -> np.ndarray:
    """Stack the items' vectors (each shape (dim,)) into unit float32 rows, shape (n, dim).

    Shape and dtype are checked per item (to name it); values are checked on the stacked batch.
    """
    arrs = []
    for it in items:
        what = f"embedding of {it.external_id!r}"
        try:
            a = np.asarray(it.vector)
        except (TypeError, ValueError) as e:
            raise InvalidEmbedding(f"{what} is not a numeric array: {e}") from None
        if not np.issubdtype(a.dtype, np.floating):
            raise InvalidEmbedding(f"{what} must be floating point, not dtype {a.dtype}")
        if a.ndim != 1:
            raise InvalidEmbedding(f"{what} must have shape ({dim},), not {a.shape}")
        if a.shape[0] != dim:
            raise DimensionMismatch(a.shape[0], space, dim, what)
        arrs.append(a)
    if not arrs:
        return np.empty((0, dim), dtype=np.float32)
    return as_unit_vectors(np.stack(arrs), dim, space, labels=[it.external_id for it in items])
