"""Alembic migrations of the gallery schema (applied by ``index.migrate.upgrade`` at start-up)."""
