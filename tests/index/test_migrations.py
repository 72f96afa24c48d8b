"""The schema comes from Alembic migrations, and the migrations produce exactly the SQLAlchemy models."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from index.db import make_engine
from index.migrate import alembic_config, current, head, upgrade
from index.tables import Base, create_schema


def test_migrations_match_the_models_and_round_trip(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert current(engine) is None
        create_schema(engine)
        assert current(engine) == head()
        with engine.connect() as conn:
            diffs = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert diffs == [], f"models and migrations differ: write a migration for {diffs}"
        create_schema(engine)  # idempotent: already at head
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert current(engine) is None
        upgrade(engine)
        assert current(engine) == head()
    finally:
        engine.dispose()
