"""An embedded PostgreSQL: a private server on a free loopback port, for the tests and the benchmarks.

Replicated coordinators keep their state in PostgreSQL (docs/operator-guide.md, "Replicated
coordinator"); a production fleet points them at its own server. This one is Debian's
binaries (package `postgresql`) running a cluster in a directory of its own, listening on
127.0.0.1 only and trusting local connections: it exists for one test session or one
benchmark run. As root it runs as the `postgres` system user (PostgreSQL refuses root).

    with EmbeddedPostgres(tmp_path) as pg:
        url = pg.new_database()        # postgresql://postgres@127.0.0.1:PORT/t_...
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import uuid
from pathlib import Path


class PostgresError(RuntimeError):
    """The embedded PostgreSQL could not be found, created or started."""


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class EmbeddedPostgres:
    def __init__(self, workdir: Path):
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise PostgresError("PostgreSQL is not installed: apt-get install postgresql (tools/bootstrap.sh does)")
        self.bin, self.root, self.user = bin_dir, Path(workdir).resolve(), "postgres"
        self.data = self.root / "data"
        self.port = 0
        self._as: list[str] = []

    def start(self) -> "EmbeddedPostgres":
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        if not self.data.exists():
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8",
                       "--no-sync"])
        # fsync off: a test server's durability is not under test (the store's transactions are)
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                   "-o", f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c max_connections=200", "start"])
        return self

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(self._as + cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise PostgresError(f"{' '.join(cmd)} failed: {(done.stderr or done.stdout).strip()}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database on this server; its URL."""
        import psycopg
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.port:
            subprocess.run(self._as + [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                                       "stop"], capture_output=True)
            self.port = 0

    def __enter__(self) -> "EmbeddedPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
