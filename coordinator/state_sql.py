"""The two databases the state store runs on, behind one small interface: SQLite and PostgreSQL.

The store writes its SQL once, in SQLite's dialect with `?` placeholders; this module turns it
into PostgreSQL's where the two differ (placeholders, column types, the clock), so every query
has one home. SQLite is the embedded default: one file in the workdir, one coordinator.
PostgreSQL lets several coordinator replicas share one fleet's state (docs/operator-guide.md,
"Replicated coordinator").
"""
from __future__ import annotations

import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol


class StoreError(Exception):
    """The state store cannot be opened or used as asked (the message says what to do)."""


class Cursor(Protocol):
    rowcount: int
    description: object

    def fetchone(self): ...
    def fetchall(self) -> list: ...


def is_database_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def without_password(url: str) -> str:
    """A database URL with its password left out (libpq then reads ~/.pgpass or PGPASSFILE)."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1@", url)


def columns(cur: Cursor) -> list[str]:
    """Column names of a query's result, whichever driver ran it."""
    return [getattr(c, "name", None) or c[0] for c in cur.description]


class SqliteDb:
    """One SQLite file in WAL mode with synchronous=FULL: a committed write survives a power cut."""
    dialect = "sqlite"
    # seconds since the epoch, from the database's clock (one machine: the same as time.time())
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"

    def __init__(self, path: Path, readonly: bool, timeout_s: float):
        self.path = Path(path)
        if readonly:
            if not self.path.exists():
                raise StoreError(f"{self.path} does not exist: no coordinator has run in this workdir")
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                                       check_same_thread=False, timeout=timeout_s)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=timeout_s)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")

    def execute(self, sql: str, args=()) -> Cursor:
        return self._db.execute(sql.replace("NOW()", self.NOW), args)

    def executemany(self, sql: str, rows) -> Cursor:
        return self._db.executemany(sql, rows)

    @contextmanager
    def transaction(self) -> Iterator["SqliteDb"]:
        """One committed transaction that holds the write lock from its start (no upgrade deadlocks)."""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            yield self

    def ddl(self, sql: str) -> str:
        return sql

    def columns_of(self, table: str) -> set[str]:
        return {r[1] for r in self._db.execute(f"PRAGMA table_info({table})").fetchall()}

    def lock_migrations(self) -> None:
        """BEGIN IMMEDIATE already excludes every other writer."""

    def close(self) -> None:
        self._db.close()

    def describe(self) -> str:
        return str(self.path)


class PostgresDb:
    """A PostgreSQL database (libpq's URL; the password from ~/.pgpass or PGPASSFILE, never the URL in logs)."""
    dialect = "postgresql"
    NOW = "EXTRACT(EPOCH FROM clock_timestamp())::DOUBLE PRECISION"
    # SQLite's flexible types, as PostgreSQL spells them: 64-bit integers (byte counts pass 2^31) and doubles
    _TYPES = [(re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGSERIAL PRIMARY KEY"),
              (re.compile(r"\bINTEGER\b"), "BIGINT"), (re.compile(r"\bREAL\b"), "DOUBLE PRECISION")]

    def __init__(self, url: str, readonly: bool, timeout_s: float):
        try:
            import psycopg
        except ImportError:
            raise StoreError("a postgresql:// state store needs psycopg: pip install 'psycopg[binary]>=3.2'") from None
        self.url = url
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout_s)))
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to the state database {self.describe()}: "
                             f"{str(exc).strip().splitlines()[0]}") from None
        if readonly:
            self._db.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")

    def execute(self, sql: str, args=()) -> Cursor:
        return self._db.execute(self._sql(sql), args)

    def executemany(self, sql: str, rows) -> Cursor:
        cur = self._db.cursor()
        cur.executemany(self._sql(sql), rows)
        return cur

    def _sql(self, sql: str) -> str:
        return sql.replace("NOW()", self.NOW).replace("?", "%s")

    @contextmanager
    def transaction(self) -> Iterator["PostgresDb"]:
        with self._db.transaction():
            yield self

    def ddl(self, sql: str) -> str:
        for pattern, replacement in self._TYPES:
            sql = pattern.sub(replacement, sql)
        return sql

    def columns_of(self, table: str) -> set[str]:
        rows = self._db.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s "
                                "AND table_schema = current_schema()", (table,)).fetchall()
        return {r[0] for r in rows}

    def lock_migrations(self) -> None:
        """Replicas starting together: one migrates, the others wait and then find the schema current."""
        self._db.execute("SELECT pg_advisory_xact_lock(7355608)")

    def close(self) -> None:
        self._db.close()

    def describe(self) -> str:
        """The URL without its password, for messages and logs."""
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", self.url)


def connect(location: str | Path, readonly: bool = False, timeout_s: float = 10.0) -> SqliteDb | PostgresDb:
    if is_database_url(location):
        return PostgresDb(str(location), readonly, timeout_s)
    return SqliteDb(Path(location), readonly, timeout_s)
