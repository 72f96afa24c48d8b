"""Metadata filters of a search: equality and ``in`` on top-level metadata keys, all conditions ANDed.

A filter is written as a JSON object, one entry per metadata key::

    {"label": 3, "color": {"in": ["red", "blue"]}, "reviewed": true}

meaning ``metadata["label"] == 3 AND metadata["color"] in ("red", "blue") AND metadata["reviewed"] is
true``. Values are scalars: strings, integers, floats or booleans. A value matches a stored value of the
same JSON kind that is equal to it: numbers compare by value (``3`` matches ``3`` and ``3.0``), a string
never matches a number (``"3"`` does not match ``3``), a boolean never matches a number (``true`` does not
match ``1``), and a missing key, ``null``, an object or a list never match.

:class:`MetadataFilter` is the validated, typed form (:meth:`MetadataFilter.parse` builds it from the JSON
form, refusing bad filters with :class:`~index.errors.InvalidInput`). :func:`matching_vec_ids` asks SQL for
the FAISS ids (``vec_id``) of a space whose item matches; the gallery hands that set to FAISS as an
``IDSelector``, so the filter is applied *inside* the search and ``k`` hits come back whenever ``k``
matching items exist (see :meth:`index.gallery.Gallery.search`).

SQL: SQLite reads a key with ``json_type``/``json_extract`` (``json_each`` for a key holding a double
quote, which a SQLite JSON path cannot name); PostgreSQL with ``json_typeof(metadata -> key)`` and
``metadata ->> key`` (the key a bound parameter). The kind test comes first, so a number is only ever
compared with numbers (PostgreSQL casts to ``numeric`` only values that are JSON numbers). Other databases
scan the items' metadata in Python with :meth:`MetadataFilter.matches`, the reference semantics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import numpy as np
from sqlalchemy import (
    ColumnElement,
    Connection,
    Numeric,
    Select,
    String,
    Table,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy import cast as sql_cast

from .errors import InvalidInput
from .store import tag_column
from .tables import Embedding, Item
from .validation import check_text

__all__ = [
    "MAX_FILTER_KEYS",
    "MAX_FILTER_VALUES",
    "MAX_KEY_LENGTH",
    "MAX_STRING_VALUE_LENGTH",
    "Condition",
    "MetadataFilter",
    "Scalar",
    "matching_rows",
    "matching_vec_ids",
]

Scalar = str | int | float | bool

MAX_FILTER_KEYS = 16
"""Most keys (conditions) in one filter."""
MAX_FILTER_VALUES = 256
"""Most values in one key's ``in`` list (and in a whole filter)."""
MAX_KEY_LENGTH = 128
"""Longest metadata key a filter may name."""
MAX_STRING_VALUE_LENGTH = 1024
"""Longest string value a filter may compare with."""

_INT64 = 2**63  # integers beyond int64 are not exact in SQLite's JSON (stored as REAL): refused

items_t = cast(Table, Item.__table__)
emb_t = cast(Table, Embedding.__table__)


def _kind(value: Any) -> str | None:
    """The JSON kind of a scalar (``"bool"``, ``"number"``, ``"str"``), None for anything else."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "str"
    return None


def _check_value(key: str, value: Any) -> Scalar:
    kind = _kind(value)
    where = f"filter value of {key!r}"
    if kind is None:
        raise InvalidInput(
            f'{where} must be a string, number or boolean (or {{"in": [...]}} of those), not '
            f"{type(value).__name__}"
        )
    if kind == "number":
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{where} must be a finite number, not {value!r}")
        if isinstance(value, int) and not -_INT64 <= value < _INT64:
            raise InvalidInput(f"{where} {value} is out of range: integers must fit in 64 bits")
        return value
    if kind == "str":
        if len(value) > MAX_STRING_VALUE_LENGTH:
            raise InvalidInput(f"{where} is longer than {MAX_STRING_VALUE_LENGTH} characters")
        check_text(value, where)
    return cast(Scalar, value)


@dataclass(frozen=True, slots=True, eq=False)
class Condition:
    """``metadata[key]`` equals one of ``values`` (same JSON kind). ``values`` holds no repeats.

    Equal and hashed by kinded values: Python has ``True == 1``, but ``{"a": true}`` and ``{"a": 1}`` are
    different filters (they key the gallery's cache of matching ids and the search batch's groups)."""

    key: str
    values: tuple[Scalar, ...]

    def _identity(self) -> tuple[str, tuple[tuple[str | None, Any], ...]]:
        return self.key, tuple((_kind(v), v) for v in self.values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Condition) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not 1 <= len(self.key) <= MAX_KEY_LENGTH:
            raise InvalidInput(
                f"filter key {str(self.key)[:80]!r} is invalid: keys are strings of 1-{MAX_KEY_LENGTH} characters"
            )
        check_text(self.key, "filter key")
        if not isinstance(self.values, tuple) or not self.values:
            raise InvalidInput(f"filter of {self.key!r} needs at least one value")
        if len(self.values) > MAX_FILTER_VALUES:
            raise InvalidInput(
                f"filter of {self.key!r} has {len(self.values)} values, at most {MAX_FILTER_VALUES}"
            )
        for v in self.values:
            _check_value(self.key, v)

    def by_kind(self) -> dict[str, list[Scalar]]:
        """The values grouped by JSON kind (``"str"``, ``"number"``, ``"bool"``)."""
        out: dict[str, list[Scalar]] = {}
        for v in self.values:
            out.setdefault(cast(str, _kind(v)), []).append(v)
        return out

    def matches(self, metadata: Any) -> bool:
        """Whether ``metadata`` (any JSON value) satisfies this condition (the reference semantics)."""
        if not isinstance(metadata, dict) or self.key not in metadata:
            return False
        stored = metadata[self.key]
        kind = _kind(stored)
        return kind is not None and any(_kind(v) == kind and v == stored for v in self.values)

    def to_json(self) -> Scalar | dict[str, list[Scalar]]:
        return self.values[0] if len(self.values) == 1 else {"in": list(self.values)}


def _dedup(values: Sequence[Scalar]) -> tuple[Scalar, ...]:
    """Values without repeats (``1`` and ``1.0`` are one number; ``1`` and ``True`` are two values)."""
    seen: set[tuple[str | None, Any]] = set()
    out: list[Scalar] = []
    for v in values:
        key = (_kind(v), v)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class MetadataFilter:
    """A validated metadata filter: every condition must hold (AND). Hashable; build with :meth:`parse`."""

    conditions: tuple[Condition, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.conditions, tuple):
            raise InvalidInput("a filter's conditions must be a tuple of Condition")
        if len(self.conditions) > MAX_FILTER_KEYS:
            raise InvalidInput(f"filter has {len(self.conditions)} keys, at most {MAX_FILTER_KEYS}")
        keys = [c.key for c in self.conditions]
        if len(set(keys)) != len(keys):
            raise InvalidInput("filter names a key twice")
        total = sum(len(c.values) for c in self.conditions)
        if total > MAX_FILTER_VALUES:
            raise InvalidInput(f"filter has {total} values in all, at most {MAX_FILTER_VALUES}")

    @classmethod
    def parse(cls, spec: MetadataFilter | Mapping[str, Any] | None) -> MetadataFilter | None:
        """The filter of its JSON form (``{"key": value, "key": {"in": [values]}}``); None (no filter) for
        None or ``{}``. Raises :class:`InvalidInput` naming what is wrong."""
        if spec is None or isinstance(spec, MetadataFilter):
            return spec if spec is None or spec.conditions else None
        if not isinstance(spec, Mapping):
            raise InvalidInput(
                f"a filter must be a JSON object of metadata key -> value, not {type(spec).__name__}"
            )
        if len(spec) > MAX_FILTER_KEYS:
            raise InvalidInput(f"filter has {len(spec)} keys, at most {MAX_FILTER_KEYS}")
        conditions = []
        for key, value in spec.items():
            if not isinstance(key, str):
                raise InvalidInput(f"filter key {key!r} must be a string")
            if isinstance(value, Mapping):
                if set(value) != {"in"}:
                    raise InvalidInput(
                        f'filter of {key[:80]!r}: an object must be {{"in": [values]}}, not with keys '
                        f"{sorted(map(str, value))[:5]}"
                    )
                values = value["in"]
                if not isinstance(values, list | tuple):
                    raise InvalidInput(f'filter of {key[:80]!r}: "in" takes a list of values')
                if len(values) > MAX_FILTER_VALUES:
                    raise InvalidInput(
                        f"filter of {key[:80]!r} has {len(values)} values, at most {MAX_FILTER_VALUES}"
                    )
                checked = [_check_value(key, v) for v in values]
                if not checked:
                    raise InvalidInput(f'filter of {key[:80]!r}: "in" needs at least one value')
            else:
                checked = [_check_value(key, value)]
            conditions.append(Condition(key, _dedup(checked)))
        return cls(tuple(conditions)) if conditions else None

    def matches(self, metadata: Any) -> bool:
        """Whether an item's metadata satisfies every condition (the semantics the SQL implements)."""
        return all(c.matches(metadata) for c in self.conditions)

    def to_json(self) -> dict[str, Any]:
        """The JSON form (``parse(f.to_json()) == f``)."""
        return {c.key: c.to_json() for c in self.conditions}

    def __iter__(self) -> Iterator[Condition]:
        return iter(self.conditions)


# ---------------------------------------------------------------------------------------------- SQL


def _sqlite_condition(column: Any, cond: Condition) -> ColumnElement[bool]:
    groups = cond.by_kind()
    if '"' in cond.key:  # a SQLite JSON path cannot name such a key: walk the object's entries
        each = func.json_each(column).table_valued("key", "type", "atom").alias("je")
        parts = []
        for kind, values in groups.items():
            if kind == "str":
                parts.append(and_(each.c.type == "text", each.c.atom.in_(values)))
            elif kind == "number":
                parts.append(and_(each.c.type.in_(["integer", "real"]), each.c.atom.in_(values)))
            else:
                parts.append(each.c.type.in_(["true" if v else "false" for v in values]))
        return exists(select(literal(1)).select_from(each).where(each.c.key == cond.key, or_(*parts)))
    path = bindparam(None, '$."' + cond.key + '"', type_=String())
    jtype = func.json_type(column, path)
    value = func.json_extract(column, path)
    parts = []
    for kind, values in groups.items():
        if kind == "str":
            parts.append(and_(jtype == "text", value.in_(values)))
        elif kind == "number":
            parts.append(and_(jtype.in_(["integer", "real"]), value.in_(values)))
        else:
            parts.append(jtype.in_(["true" if v else "false" for v in values]))
    return or_(*parts)


def _postgres_condition(column: Any, cond: Condition) -> ColumnElement[bool]:
    key = bindparam(None, cond.key, type_=String())
    node = column.op("->")(key)
    text = column.op("->>", return_type=String())(key)
    jtype = func.json_typeof(node)
    parts = []
    for kind, values in cond.by_kind().items():
        if kind == "str":
            parts.append(and_(jtype == "string", text.in_(values)))
        elif kind == "number":
            # the CASE keeps the cast away from values that are not numbers, whatever order PostgreSQL picks
            number = case((jtype == "number", sql_cast(text, Numeric())))
            decimals = [Decimal(repr(v)) if isinstance(v, float) else Decimal(v) for v in values]
            parts.append(number.in_([bindparam(None, d, type_=Numeric()) for d in decimals]))
        else:
            parts.append(and_(jtype == "boolean", text.in_(["true" if v else "false" for v in values])))
    return or_(*parts)


def sql_condition(flt: MetadataFilter, dialect: str, column: Any = None) -> ColumnElement[bool] | None:
    """The WHERE clause of ``flt`` over the items' metadata column for ``dialect`` (``"sqlite"``,
    ``"postgresql"``), or None when this database is not supported in SQL (the caller then filters with
    :meth:`MetadataFilter.matches`)."""
    column = items_t.c.metadata if column is None else column
    if dialect == "sqlite":
        build = _sqlite_condition
    elif dialect == "postgresql":
        build = _postgres_condition
    else:
        return None
    if not flt.conditions:
        return None
    return and_(*(build(column, c) for c in flt.conditions))


def _space_rows(space: str, *columns: Any) -> Select[Any]:
    return (
        select(*columns)
        .select_from(emb_t.join(items_t, items_t.c.id == emb_t.c.item_id))
        .where(emb_t.c.space == space)
    )


def matching_vec_ids(conn: Connection, space: str, flt: MetadataFilter) -> np.ndarray:
    """The vec_ids (FAISS ids) of ``space`` whose item matches ``flt``: sorted (n,) int64, one SQL query."""
    where = sql_condition(flt, conn.dialect.name)
    if where is not None:
        stmt = _space_rows(space, emb_t.c.vec_id).where(where).order_by(emb_t.c.vec_id)
        ids = conn.execution_options(yield_per=200_000).execute(stmt).scalars()
        parts = [np.asarray(p, dtype=np.int64) for p in ids.partitions()]
        return np.concatenate(parts) if parts else np.empty(0, np.int64)
    rows = conn.execute(_space_rows(space, emb_t.c.vec_id, items_t.c.metadata).order_by(emb_t.c.vec_id))
    return np.fromiter((vid for vid, meta in rows if flt.matches(meta)), dtype=np.int64)


def matching_rows(
    conn: Connection, space: str, flt: MetadataFilter, dim: int
) -> tuple[np.ndarray, list[tuple[int, str, str]], np.ndarray]:
    """The rows of ``space`` whose item matches ``flt``, vectors included: ``(vec_ids (n,) int64,
    [(item_id, external_id, version)], vectors (n, dim) float32)``, by vec_id. For exact searches of small
    filtered sets."""
    cols = (emb_t.c.vec_id, emb_t.c.item_id, items_t.c.external_id, tag_column(), emb_t.c.vector)
    where = sql_condition(flt, conn.dialect.name)
    rows: Sequence[Any]
    if where is not None:
        rows = conn.execute(_space_rows(space, *cols).where(where).order_by(emb_t.c.vec_id)).all()
    else:
        rows = [
            r[:-1]
            for r in conn.execute(_space_rows(space, *cols, items_t.c.metadata).order_by(emb_t.c.vec_id))
            if flt.matches(r[-1])
        ]
    if not rows:
        return np.empty(0, np.int64), [], np.empty((0, dim), np.float32)
    vec_ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    entries = [(int(r[1]), r[2], r[3]) for r in rows]
    vectors = np.frombuffer(b"".join(bytes(r[4]) for r in rows), dtype="<f4").reshape(len(rows), dim)
    return vec_ids, entries, vectors.astype(np.float32)
