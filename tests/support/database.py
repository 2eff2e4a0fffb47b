"""The real PostgreSQL on 127.0.0.1 that integration tests create their throwaway databases in."""

from __future__ import annotations

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def pg_database_url(name: str) -> str:
    """The SQLAlchemy URL of database ``name`` on the test server."""
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
