"""Engine factory: one place that knows the differences between SQLite and PostgreSQL.

Everything else in the package issues portable SQLAlchemy Core/ORM statements only; the SQLite
specifics live in the connect-time PRAGMAs below.

Durability on SQLite: the database runs in WAL mode. With ``synchronous=FULL`` (the default here) the
WAL is fsynced at every commit, so a commit that returned survives a process kill *and* a power loss.
``synchronous=NORMAL`` is faster per commit and still survives a process kill (committed pages are in the
WAL file, the OS keeps them), but may lose the last transactions on power loss. The gallery commits one
transaction per batch, so FULL costs little; pass ``sqlite_synchronous="NORMAL"`` to trade it away.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from .errors import InvalidInput

log = logging.getLogger(__name__)

SQLITE_FILE = "gallery.db"
_SYNC_MODES = {"OFF", "NORMAL", "FULL", "EXTRA"}


def default_database_url(data_dir: Path) -> str:
    """The default SQLite URL: ``<data_dir>/gallery.db``."""
    return f"sqlite:///{Path(data_dir).resolve() / SQLITE_FILE}"


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(
    url: str,
    *,
    sqlite_synchronous: str = "FULL",
    busy_timeout_ms: int = 30_000,
    **kwargs: Any,
) -> Engine:
    """Create an engine for ``url`` (any SQLAlchemy URL; tested with SQLite files and PostgreSQL/psycopg).

    For SQLite every connection gets ``journal_mode=WAL`` (readers do not block the writer),
    ``synchronous`` as given, ``foreign_keys=ON`` (SQLite ignores FKs otherwise) and a
    ``busy_timeout`` (another process holding the write lock makes us wait, not fail).
    In-memory SQLite is refused: the gallery is durable by contract.
    """
    sync = sqlite_synchronous.upper()
    if sync not in _SYNC_MODES:
        raise ValueError(
            f"sqlite_synchronous must be one of {sorted(_SYNC_MODES)}, not {sqlite_synchronous!r}"
        )
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed.query):
            raise ValueError("in-memory SQLite cannot hold a durable gallery; give a file URL")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA synchronous={sync}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            finally:
                cur.close()

        _refuse_nul_text(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    engine = create_engine(parsed, **kwargs)
    _refuse_nul_text(engine)
    return engine


def _refuse_nul_text(engine: Engine) -> None:
    """Refuse any text parameter holding a NUL character or a lone surrogate, on every backend, before it
    reaches the driver.

    PostgreSQL cannot store or even compare text with NUL (the driver raises a DataError, which would surface
    as a server error); SQLite would store it. No driver can encode a lone surrogate (UnicodeEncodeError).
    Either way no valid id, name or value contains one, so the caller gets :class:`InvalidInput` (a 4xx at
    the HTTP door) and both backends behave the same.
    """

    @event.listens_for(engine, "before_cursor_execute")
    def _check(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
    ) -> None:
        rows = parameters if executemany else [parameters]
        for row in rows:
            for value in row.values() if isinstance(row, dict) else row or ():
                if isinstance(value, str) and "\x00" in value:
                    raise InvalidInput(
                        f"text with a NUL character (\\x00) cannot be stored or looked up: {value[:80]!r}"
                    )
                if isinstance(value, str) and not value.isascii() and not _is_utf8(value):
                    raise InvalidInput(
                        f"text with a lone surrogate (not valid UTF-8) cannot be stored or looked "
                        f"up: {ascii(value[:80])}"
                    )


def _is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (not so with a lone surrogate, e.g. from JSON's ``"\\udfff"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
