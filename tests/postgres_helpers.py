"""A real PostgreSQL server for the tests that ask for one (coordinator/ops/postgres.py): one per test session,
a new database per test."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from coordinator.ops.postgres import EmbeddedPostgres


@pytest.fixture(scope="session")
def postgres_server():
    with EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="edgeblock-pg-"))) as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A URL to a new database on the session's real PostgreSQL server."""
    return postgres_server.new_database()
