"""Model versions and the active version, in SQL.

Plain functions over a :class:`sqlalchemy.Connection` (the caller owns the transaction). The active version
is persisted (settings row ``active_version``) so that restarts and replicas agree on it.
"""

from __future__ import annotations

import json
from typing import Any, cast

from sqlalchemy import Connection, Table, func, insert, select, update

from .errors import DimensionMismatch, InvalidInput, UnknownVersion, VersionConflict
from .tables import ACTIVE_VERSION_KEY, ModelVersion, Setting, utcnow
from .types import VersionInfo
from .validation import check_name

STATUSES = ("registered", "active", "retired")


def _info(row: Any) -> VersionInfo:
    return VersionInfo(
        version=row.version,
        space=row.space,
        embedding_dim=int(row.embedding_dim),
        compatible_with=row.compatible_with,
        card=dict(row.card or {}),
        status=row.status,
        created_at=row.created_at,
    )


def _validate(info: VersionInfo) -> None:
    check_name(info.version, "version")
    check_name(info.space, "space")
    if info.compatible_with is not None:
        check_name(info.compatible_with, "compatible_with version")
    dim = info.embedding_dim
    if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= 65_536:
        raise InvalidInput(
            f"embedding_dim of version {info.version!r} must be an int in [1, 65536], not {dim!r}"
        )
    if not isinstance(info.card, dict):
        raise InvalidInput(f"card of version {info.version!r} must be a dict, not {type(info.card).__name__}")
    try:
        json.dumps(info.card, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"card of version {info.version!r} is not JSON-serialisable: {e}") from None


def get_version(conn: Connection, version: str) -> VersionInfo:
    row = conn.execute(select(ModelVersion.__table__).where(ModelVersion.version == version)).first()
    if row is None:
        raise UnknownVersion(version)
    return _info(row)


def list_versions(conn: Connection) -> list[VersionInfo]:
    rows = conn.execute(
        select(ModelVersion.__table__).order_by(ModelVersion.created_at, ModelVersion.version)
    )
    return [_info(r) for r in rows]


def space_dims(conn: Connection) -> dict[str, int]:
    """Every known space and its dimension (from its versions; all versions of a space share it)."""
    rows = conn.execute(
        select(ModelVersion.space, func.min(ModelVersion.embedding_dim)).group_by(ModelVersion.space)
    )
    return {space: int(dim) for space, dim in rows}


def register_version(conn: Connection, info: VersionInfo) -> VersionInfo:
    """Register ``info`` (status ``registered``). Idempotent for an identical definition.

    Raises :class:`VersionConflict` if the version exists with another definition, and
    :class:`DimensionMismatch` if its space already exists with another dimension.
    """
    _validate(info)
    existing = conn.execute(
        select(ModelVersion.__table__).where(ModelVersion.version == info.version)
    ).first()
    if existing is not None:
        old = _info(existing)
        if not old.same_definition(info):
            raise VersionConflict(
                f"version {info.version!r} is already registered with another definition "
                f"(space {old.space!r}, dim {old.embedding_dim}, compatible_with {old.compatible_with!r})"
            )
        return old
    dim = space_dims(conn).get(info.space)
    if dim is not None and dim != info.embedding_dim:
        raise DimensionMismatch(
            info.embedding_dim, info.space, dim, what=f"version {info.version!r} embedding"
        )
    conn.execute(
        cast(Table, ModelVersion.__table__)
        .insert()
        .values(
            version=info.version,
            space=info.space,
            compatible_with=info.compatible_with,
            embedding_dim=info.embedding_dim,
            status="registered",
            card=info.card,
            created_at=utcnow(),
        )
    )
    return get_version(conn, info.version)


def set_version_status(conn: Connection, version: str, status: str) -> VersionInfo:
    """Set a version's status to ``registered`` or ``retired`` (``active`` only via :func:`set_active`)."""
    if status not in ("registered", "retired"):
        raise InvalidInput(
            f"status must be 'registered' or 'retired' (use set_active to activate), not {status!r}"
        )
    current = get_version(conn, version)
    if current.status == "active":
        raise VersionConflict(
            f"version {version!r} is active: activate another version before changing its status"
        )
    conn.execute(update(ModelVersion).where(ModelVersion.version == version).values(status=status))
    return get_version(conn, version)


def get_active(conn: Connection) -> str | None:
    return conn.execute(select(Setting.value).where(Setting.key == ACTIVE_VERSION_KEY)).scalar()


HISTORY_KEY = "active_history"
HISTORY_LIMIT = 100
LOG_KEY = "activation_log"  # what each activation was: when, rollback or not, and the caller's note


def get_setting(conn: Connection, key: str) -> str | None:
    return conn.execute(select(Setting.value).where(Setting.key == key)).scalar()


def put_setting(conn: Connection, key: str, value: str | None) -> None:
    """Insert or replace a settings row (portable: UPDATE, then INSERT if nothing was there)."""
    res = conn.execute(update(Setting).where(Setting.key == key).values(value=value, updated_at=utcnow()))
    if res.rowcount == 0:
        conn.execute(insert(Setting).values(key=key, value=value, updated_at=utcnow()))


def activation_history(conn: Connection) -> list[str]:
    """Versions activated so far, oldest first; the last one is the active version."""
    raw = get_setting(conn, HISTORY_KEY)
    return list(json.loads(raw)) if raw else []


def activation_log(conn: Connection) -> list[dict[str, Any]]:
    """Every activation, oldest first (the last ``HISTORY_LIMIT``): version, time, rollback, note."""
    raw = get_setting(conn, LOG_KEY)
    return list(json.loads(raw)) if raw else []


def set_active(
    conn: Connection, version: str, *, rollback: bool = False, note: dict[str, Any] | None = None
) -> VersionInfo:
    """Make ``version`` the active one; the previous active version goes back to ``registered``.

    The activation is appended to the persisted history; with ``rollback=True`` the current entry is popped
    instead and ``version`` must be the entry before it. Refuses a retired version
    (:class:`VersionConflict`). Whether the version *may* serve over the gallery (same space) is the
    caller's policy, not checked here.
    """
    history = activation_history(conn)
    if rollback:
        if len(history) < 2 or history[-2] != version:
            raise VersionConflict(f"cannot roll back to {version!r}: it is not the previous activation")
        history.pop()
    elif not history or history[-1] != version:
        history.append(version)
    put_setting(conn, HISTORY_KEY, json.dumps(history[-HISTORY_LIMIT:]))
    log = activation_log(conn)
    log.append({"version": version, "at": utcnow().isoformat(), "rollback": rollback, **(note or {})})
    put_setting(conn, LOG_KEY, json.dumps(log[-HISTORY_LIMIT:]))
    info = get_version(conn, version)
    if info.status == "retired":
        raise VersionConflict(f"version {version!r} is retired and cannot be activated")
    previous = get_active(conn)
    if previous is not None and previous != version:
        conn.execute(update(ModelVersion).where(ModelVersion.version == previous).values(status="registered"))
    conn.execute(update(ModelVersion).where(ModelVersion.version == version).values(status="active"))
    conn.execute(
        update(Setting).where(Setting.key == ACTIVE_VERSION_KEY).values(value=version, updated_at=utcnow())
    )
    return get_version(conn, version)
