"""Alembic environment: runs on a connection handed in by ``index.migrate`` (or, from the alembic CLI,
on ``sqlalchemy.url`` / ``GRACEFUL_DATABASE_URL``)."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import Connection, text

from index.tables import Base

config = context.config
target_metadata = Base.metadata
# Any constant: serialises concurrent upgrades (two replicas starting at once) on PostgreSQL.
_PG_LOCK_KEY = 0x67726163  # "grac"


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from index.db import make_engine

    url = os.environ.get("GRACEFUL_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: set GRACEFUL_DATABASE_URL or sqlalchemy.url")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run against a database")
run_migrations_online()
