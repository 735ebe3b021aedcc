"""The coordinator's durable state: devices, rounds, tasks and updates, in SQLite or PostgreSQL.

Every change is one transaction, committed before the coordinator acts on it (an update is
acknowledged to its device only after record_update returned), so a coordinator killed at
any moment restarts with every accepted update and continues the same round. Weights live
in files named by their hash; the database holds the hashes. A task's update can be recorded
once: a duplicate delivery changes nothing and is reported as such, so no update is ever
counted twice, whichever replica receives it.

SQLite (a WAL-mode file with synchronous=FULL) is the embedded default; PostgreSQL lets
several coordinator replicas share one fleet's state, with a lease that says which one leads.
The schema carries its version; an older store is migrated in one transaction when a
coordinator opens it, and a newer one is refused.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from coordinator.state_sql import Cursor, PostgresDb, SqliteDb, StoreError, columns, connect, is_database_url
from coordinator.strategies.base import Assignment, assignment_from_dict
from edge_runtime.wire.protocol import Task

MAX_REJECTIONS = 100_000   # rejections kept (about 30 MB); the oldest go first
# in a closed round's metrics while its new model is still being tested (the test runs once the next round's tasks
# are out):
# such a round is not yet in closed_rounds, so metrics.jsonl and every reader see each round once, complete
TESTING = "testing"

# The tables as the first versioned schema has them. Written in SQLite's dialect; PostgresDb.ddl translates.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, tier TEXT NOT NULL, budget_bytes INTEGER NOT NULL,
    runtime_version TEXT NOT NULL, cores INTEGER NOT NULL, disk_free_bytes INTEGER NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, online INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, state TEXT NOT NULL CHECK (state IN ('open', 'closed')),
    opened_at REAL NOT NULL, deadline_at REAL NOT NULL, weights_before TEXT NOT NULL,
    weights_after TEXT, plan TEXT NOT NULL, strategy_state TEXT NOT NULL, closed_at REAL, metrics TEXT);
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, round INTEGER NOT NULL REFERENCES rounds(round), device_id TEXT NOT NULL,
    spec TEXT NOT NULL, sent_at REAL NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('sent', 'accepted', 'rejected', 'failed')), reason TEXT);
CREATE TABLE IF NOT EXISTS updates (
    task_id TEXT PRIMARY KEY REFERENCES tasks(task_id), round INTEGER NOT NULL, device_id TEXT NOT NULL,
    blob_sha256 TEXT NOT NULL, num_examples INTEGER NOT NULL, loss REAL NOT NULL,
    peak_rss_bytes INTEGER NOT NULL, seconds REAL NOT NULL, received_at REAL NOT NULL, blob_size INTEGER NOT NULL,
    downloaded_bytes INTEGER NOT NULL, agent_peak_rss_bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS scores (
    task_id TEXT PRIMARY KEY REFERENCES tasks(task_id), round INTEGER NOT NULL, device_id TEXT NOT NULL,
    scores TEXT NOT NULL, num_examples INTEGER NOT NULL, peak_rss_bytes INTEGER NOT NULL,
    agent_peak_rss_bytes INTEGER NOT NULL, seconds REAL NOT NULL, received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_by_device ON tasks (round, device_id);
CREATE TABLE IF NOT EXISTS holdouts (
    task_id TEXT PRIMARY KEY REFERENCES updates(task_id), examples INTEGER NOT NULL, accuracy_before REAL,
    accuracy REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rejections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, device_id TEXT, task_id TEXT, reason TEXT NOT NULL);
"""
# Columns the unversioned stores of earlier releases may lack (their tables grew before the schema had a
# version): added with the value an old row means.
UNVERSIONED_COLUMNS = (("rounds", "metrics", "TEXT"), ("tasks", "reason", "TEXT"),
                       ("updates", "blob_size", "INTEGER NOT NULL DEFAULT 0"),
                       ("updates", "downloaded_bytes", "INTEGER NOT NULL DEFAULT 0"),
                       ("updates", "agent_peak_rss_bytes", "INTEGER NOT NULL DEFAULT 0"))


def _statements(db: SqliteDb | PostgresDb, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            db.execute(db.ddl(statement))


def _v1_tables(db: SqliteDb | PostgresDb) -> None:
    """Every table, and the columns an unversioned store from before lacks."""
    have = {t: db.columns_of(t) for t in {t for t, _, _ in UNVERSIONED_COLUMNS}}
    for table, column, definition in UNVERSIONED_COLUMNS:
        if have[table] and column not in have[table]:
            db.execute(db.ddl(f"ALTER TABLE {table} ADD COLUMN {column} {definition}"))
    _statements(db, SCHEMA_V1)


def _v2_leases(db: SqliteDb | PostgresDb) -> None:
    """Which replica leads, until when (the database's clock), and an epoch that grows with each new leader."""
    _statements(db, "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
                    "expires_at REAL NOT NULL, epoch INTEGER NOT NULL)")


def _v3_rejection_kinds(db: SqliteDb | PostgresDb) -> None:
    """Rejections counted by kind (coordinator/guards.py, REJECTION_KINDS): a kind on each row, and a running total
    per kind that the trim to the newest MAX_REJECTIONS rows leaves alone. The rejections stored before count as
    'other', as many as their ids say (the trimmed ones too)."""
    db.execute(db.ddl("ALTER TABLE rejections ADD COLUMN kind TEXT NOT NULL DEFAULT 'other'"))
    _statements(db, "CREATE TABLE IF NOT EXISTS rejection_totals (kind TEXT PRIMARY KEY, total INTEGER NOT NULL)")
    db.execute("INSERT INTO rejection_totals (kind, total) SELECT 'other', n FROM (SELECT MAX(id) AS n FROM "
               "rejections) AS stored WHERE n IS NOT NULL")


def _v4_answer_indexes(db: SqliteDb | PostgresDb) -> None:
    """Each device's answers by round: a round's close reads every device's recent sample counts (the claim cap),
    one query per device, which scanned the whole updates table (1 s at 1,000 devices after 30 rounds)."""
    _statements(db, "CREATE INDEX IF NOT EXISTS updates_by_device ON updates (device_id, round); "
                    "CREATE INDEX IF NOT EXISTS scores_by_device ON scores (device_id, round)")


# (version, what it changes, the change): append only; a released step is never edited
MIGRATIONS: list[tuple[int, str, Callable[[SqliteDb | PostgresDb], None]]] = [
    (1, "the first versioned schema (adds the columns older stores lack)", _v1_tables),
    (2, "the leader lease of replicated coordinators", _v2_leases),
    (3, "a kind on every rejection, and running totals per kind", _v3_rejection_kinds),
    (4, "indexes on each device's updates and scores by round", _v4_answer_indexes),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


@dataclass(frozen=True)
class RoundRow:
    round: int
    state: str
    opened_at: float
    deadline_at: float
    weights_before: str
    weights_after: str | None
    plan: dict
    strategy_state: dict


@dataclass(frozen=True)
class TaskRow:
    """A task as stored: who, which round, how it was settled, and its spec (the plan's assignment and the
    Task message sent), read back typed on demand."""
    task_id: str
    round: int
    device_id: str
    spec: dict
    status: str                      # sent | accepted | rejected | failed
    reason: str | None = None

    @property
    def assignment(self) -> Assignment:
        return assignment_from_dict(self.spec["assignment"])

    @property
    def task(self) -> Task:
        return Task.decode(json.dumps(self.spec["task"]).encode())

    @property
    def weights_index(self) -> str | None:
        """The index of the weights this task was sent when they were the device's own (a personalised
        schedule's), not the round's global weights; None otherwise."""
        return self.spec.get("weights")


def task_spec(assignment: Assignment, task: bytes, weights_index: str | None = None) -> dict:
    """What the store keeps of a task: the assignment the strategy planned, the message the device gets (`task`,
    as encoded), and the index of the weights it was sent when they were the device's own rather than the global
    ones."""
    spec = {"assignment": asdict(assignment), "task": json.loads(task)}
    if weights_index is not None:
        spec["weights"] = weights_index
    return spec


@dataclass(frozen=True)
class UpdateRow:
    task_id: str
    round: int
    device_id: str
    blob_sha256: str
    num_examples: int
    loss: float
    peak_rss_bytes: int
    seconds: float
    blob_size: int = 0
    downloaded_bytes: int = 0
    agent_peak_rss_bytes: int = 0
    # accuracy on the rows the device held out (a table of its own: a workdir from before it opens unchanged)
    holdout_examples: int | None = None
    holdout_accuracy_before: float | None = None
    holdout_accuracy: float | None = None


STATE_URL = "state.url"   # in a replicated run's workdir: the database it keeps its state in (no password)


def run_store_location(workdir: Path) -> Path | str | None:
    """Where the run in `workdir` keeps its state, for tools beside it: the database its replicas share (named by
    the workdir's state.url), its SQLite file, or None when no coordinator has started there."""
    url, db = Path(workdir) / STATE_URL, Path(workdir) / "state.db"
    if url.exists():
        return url.read_text().strip()
    return db if db.exists() else None


def run_store(workdir: Path, readonly: bool = True, timeout_s: float = 10.0) -> "StateStore":
    """The state store of the run in `workdir` (run_store_location); StoreError when there is none."""
    location = run_store_location(workdir)
    if location is None:
        raise StoreError(f"{workdir} holds no coordinator state (no state.db or {STATE_URL})")
    return StateStore(location, readonly=readonly, timeout_s=timeout_s)


class LeaseLost(StoreError):
    """A replica acted as leader after its lease ran out; another replica leads now."""


class StateStore:
    def __init__(self, location: Path | str, readonly: bool = False, timeout_s: float = 10.0):
        """location: the SQLite file, or a postgresql:// URL that several replicas share.
        readonly: for status tools beside a running coordinator; they must never write its state.
        timeout_s: how long a read waits for the coordinator's write lock (or a connection)."""
        self.location = location if is_database_url(location) else Path(location)
        self._db = connect(location, readonly=readonly, timeout_s=timeout_s)
        self.shared = isinstance(self._db, PostgresDb)
        self.migrated: list[int] = []
        if readonly:
            self._check_version(self._stored_version())
        else:
            self._migrate()

    def describe(self) -> str:
        return self._db.describe()

    def close(self) -> None:
        self._db.close()

    # -- schema versions -------------------------------------------------------------------------
    def _stored_version(self) -> int:
        if not self._db.columns_of("meta"):
            return 0
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(json.loads(row[0])) if row else 0

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise StoreError(f"the state store {self.describe()} has schema version {version}, newer than this "
                             f"edgeblock's {SCHEMA_VERSION}: run the edgeblock release that wrote it, or a newer one")
        if version < SCHEMA_VERSION:
            raise StoreError(f"the state store {self.describe()} has schema version {version}, older than this "
                             f"edgeblock's {SCHEMA_VERSION}: start the coordinator on it once to migrate it")

    def _migrate(self) -> None:
        """Bring the store to SCHEMA_VERSION in one transaction (a crash leaves it as it was)."""
        with self._db.transaction():
            self._db.lock_migrations()
            version = self._stored_version()
            if version > SCHEMA_VERSION:
                self._check_version(version)
            for number, _what, step in MIGRATIONS:
                if number > version:
                    step(self._db)
                    self._db.execute("INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE "
                                     "SET value = excluded.value", (json.dumps(number),))
                    self.migrated.append(number)

    def _tx(self, sql: str, args=()) -> Cursor:
        with self._db.transaction():  # one committed transaction
            return self._db.execute(sql, args)

    # -- meta -----------------------------------------------------------------------------
    def set_meta(self, key: str, value) -> None:
        self._tx("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                 (key, json.dumps(value)))

    def meta_setdefault(self, key: str, value):
        """The stored value, or `value` stored now: replicas starting together agree on the first one written."""
        with self._db.transaction():
            self._db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT DO NOTHING", (key, json.dumps(value)))
            return json.loads(self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    # -- the leader lease (replicated coordinators) ---------------------------------------------------
    def hold_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        """Take or renew the lease `name` for ttl_s seconds of the database's clock; its epoch while `holder`
        holds it (it grows with every change of holder: a fencing token), None while another holder's runs."""
        with self._db.transaction():
            cur = self._db.execute(
                "INSERT INTO leases (name, holder, expires_at, epoch) VALUES (?, ?, NOW() + ?, 1) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at, "
                "epoch = leases.epoch + CASE WHEN leases.holder = excluded.holder THEN 0 ELSE 1 END "
                "WHERE leases.holder = excluded.holder OR leases.expires_at < NOW()", (name, holder, ttl_s))
            if cur.rowcount != 1:
                return None
            return int(self._db.execute("SELECT epoch FROM leases WHERE name = ?", (name,)).fetchone()[0])

    def _check_fence(self, fence: tuple[str, str, int] | None) -> None:
        """Inside a transaction: refuse a leader's write once another holder took its lease (name, holder, epoch).
        One that ran out but was not taken still fences: no other leader wrote since. The lease row stays
        locked to the commit, so a new leader cannot take it in between."""
        if fence is None:
            return
        row = self._db.execute("SELECT 1 FROM leases WHERE name = ? AND holder = ? AND epoch = ?"
                               + (" FOR UPDATE" if self.shared else ""), fence).fetchone()
        if row is None:
            raise LeaseLost(f"{fence[1]} no longer holds the {fence[0]} lease of epoch {fence[2]}")

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up at once (a clean stop): a standby need not wait for it to expire."""
        self._tx("UPDATE leases SET expires_at = 0 WHERE name = ? AND holder = ?", (name, holder))

    def lease(self, name: str) -> dict | None:
        """Who holds the lease, until when, in which epoch (for status tools)."""
        cur = self._db.execute("SELECT holder, expires_at, epoch, NOW() AS now FROM leases WHERE name = ?", (name,))
        row = cur.fetchone()
        return None if row is None else dict(zip(columns(cur), row))

    def meta(self, key: str, default=None):
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # -- devices ----------------------------------------------------------------------------
    def upsert_device(self, hello, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._tx("""INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)
                    ON CONFLICT(device_id) DO UPDATE SET tier = excluded.tier, budget_bytes = excluded.budget_bytes,
                    runtime_version = excluded.runtime_version, cores = excluded.cores,
                    disk_free_bytes = excluded.disk_free_bytes, last_seen = excluded.last_seen, online = 1""",
                 (hello.device_id, hello.tier, hello.budget_bytes, hello.runtime_version, hello.cores,
                  hello.disk_free_bytes, now, now))

    def set_online(self, device_id: str, online: bool, now: float | None = None) -> None:
        self._tx("UPDATE devices SET online = ?, last_seen = ? WHERE device_id = ?",
                 (int(online), time.time() if now is None else now, device_id))

    def has_device(self, device_id: str) -> bool:
        """Whether a device ever said hello (one indexed lookup, not a scan of the registry)."""
        return self._db.execute("SELECT 1 FROM devices WHERE device_id = ?", (device_id,)).fetchone() is not None

    def device_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]

    def devices(self, online_only: bool = False) -> list[dict]:
        cur = self._db.execute("SELECT * FROM devices" + (" WHERE online = 1" if online_only else "")
                               + " ORDER BY device_id")
        cols = columns(cur)
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    # -- rounds and tasks ---------------------------------------------------------------------
    def open_round(self, round_no: int, deadline_at: float, weights_before: str, plan: dict,
                   strategy_state: dict, tasks: list[tuple[str, str, dict]], now: float | None = None,
                   fence: tuple[str, str, int] | None = None) -> None:
        """Open a round and record its tasks (task_id, device_id, spec) in one transaction (refused with
        LeaseLost when `fence`, the leader's lease, is no longer held)."""
        now = time.time() if now is None else now
        with self._db.transaction():
            self._check_fence(fence)
            self._db.execute("INSERT INTO rounds VALUES (?, 'open', ?, ?, ?, NULL, ?, ?, NULL, NULL)",
                             (round_no, now, deadline_at, weights_before, json.dumps(plan), json.dumps(strategy_state)))
            self._db.executemany("INSERT INTO tasks VALUES (?, ?, ?, ?, ?, 'sent', NULL)",
                                 [(t, round_no, d, json.dumps(spec), now) for t, d, spec in tasks])

    def current_round(self) -> RoundRow | None:
        row = self._db.execute("SELECT round, state, opened_at, deadline_at, weights_before, weights_after, plan, "
                               "strategy_state FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        if row is None:
            return None
        return RoundRow(*row[:6], json.loads(row[6]), json.loads(row[7]))

    def open_round_no(self) -> int | None:
        """The open round's number, else None: what every device message asks, without the round's plan (a JSON
        of every device's assignment, 200 KB at 1,000 devices, decoded per upload chunk before)."""
        row = self._db.execute("SELECT round, state FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        return row[0] if row is not None and row[1] == "open" else None

    def task(self, task_id: str) -> TaskRow | None:
        row = self._db.execute("SELECT task_id, round, device_id, spec, status, reason FROM tasks WHERE task_id = ?",
                               (task_id,)).fetchone()
        return None if row is None else TaskRow(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])

    def task_of(self, round_no: int, device_id: str) -> TaskRow | None:
        """A device's task in a round (a device has at most one per round)."""
        row = self._db.execute("SELECT task_id, round, device_id, spec, status, reason FROM tasks "
                               "WHERE round = ? AND device_id = ?", (round_no, device_id)).fetchone()
        return None if row is None else TaskRow(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])

    def recent_outcomes(self, rounds: int) -> dict[str, list[tuple[int, str | None]]]:
        """{device: [(round, the miss when it did not answer in time, else None)]} over the last closed rounds,
        oldest first: what benching stragglers is decided from (coordinator/guards.py)."""
        from coordinator.guards import missed
        rows = self._db.execute("SELECT t.round, t.device_id, t.status, t.reason FROM tasks t JOIN rounds r "
                                "ON r.round = t.round WHERE r.state = 'closed' AND t.round > "
                                "(SELECT COALESCE(MAX(round), 0) FROM rounds) - ? ORDER BY t.round",
                                (rounds,)).fetchall()
        out: dict[str, list] = {}
        for round_no, device, status, reason in rows:
            out.setdefault(device, []).append((round_no, missed(status, reason)))
        return out

    def waiting_tasks(self, round_no: int) -> list[tuple[str, str]]:
        """(task id, device) of the round's tasks still waiting for their device: what the coordinator checks five
        times a second, so without the specs (decoding every task's, 1,000 a tick, was most of its time)."""
        return [tuple(r) for r in self._db.execute("SELECT task_id, device_id FROM tasks WHERE round = ? AND "
                                                   "status = 'sent' ORDER BY task_id", (round_no,)).fetchall()]

    def tasks(self, round_no: int) -> list[TaskRow]:
        rows = self._db.execute("SELECT task_id, round, device_id, spec, status, reason FROM tasks WHERE round = ? "
                                "ORDER BY task_id", (round_no,)).fetchall()
        return [TaskRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    def record_update(self, update) -> bool:
        """Durably record an accepted update; False (and nothing changes) if this task's update is already in."""
        with self._db.transaction():
            cur = self._db.execute(
                "INSERT INTO updates (task_id, round, device_id, blob_sha256, num_examples, loss, peak_rss_bytes, "
                "seconds, received_at, blob_size, downloaded_bytes, agent_peak_rss_bytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (update.task_id, update.round, update.device_id, update.blob_sha256, update.num_examples,
                 update.loss, update.peak_rss_bytes, update.seconds, time.time(), update.blob_size,
                 getattr(update, "downloaded_bytes", 0), getattr(update, "agent_peak_rss_bytes", 0)))
            if cur.rowcount == 0:
                return False
            if getattr(update, "holdout_accuracy", None) is not None:
                self._db.execute("INSERT INTO holdouts VALUES (?, ?, ?, ?)",
                                 (update.task_id, update.holdout_examples, update.holdout_accuracy_before,
                                  update.holdout_accuracy))
            self._db.execute("UPDATE tasks SET status = 'accepted' WHERE task_id = ?", (update.task_id,))
            self._db.execute("UPDATE devices SET last_seen = ? WHERE device_id = ?", (time.time(), update.device_id))
            return True

    def record_scores(self, msg) -> bool:
        """Durably record a score task's answer; False (and nothing changes) if it is already in."""
        with self._db.transaction():
            cur = self._db.execute("INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                   (msg.task_id, msg.round, msg.device_id, json.dumps(msg.scores), msg.num_examples,
                                    msg.peak_rss_bytes, msg.agent_peak_rss_bytes, msg.seconds, time.time()))
            if cur.rowcount == 0:
                return False
            self._db.execute("UPDATE tasks SET status = 'accepted' WHERE task_id = ?", (msg.task_id,))
            self._db.execute("UPDATE devices SET last_seen = ? WHERE device_id = ?", (time.time(), msg.device_id))
            return True

    def scores(self, round_no: int) -> list[dict]:
        cur = self._db.execute("SELECT task_id, device_id, scores, num_examples, peak_rss_bytes, agent_peak_rss_bytes, "
                               "seconds FROM scores WHERE round = ? ORDER BY task_id", (round_no,))
        cols = columns(cur)
        return [dict(zip(cols, r), scores=json.loads(r[2])) for r in cur.fetchall()]

    def mark_task(self, task_id: str, status: str, reason: str | None = None) -> bool:
        """Settle a task still waiting for its update (rejected or failed, with why); False if it was settled."""
        cur = self._tx("UPDATE tasks SET status = ?, reason = ? WHERE task_id = ? AND status = 'sent'",
                       (status, reason, task_id))
        return cur.rowcount == 1

    def updates(self, round_no: int) -> list[UpdateRow]:
        rows = self._db.execute("SELECT u.task_id, round, device_id, blob_sha256, num_examples, loss, peak_rss_bytes, "
                                "seconds, blob_size, downloaded_bytes, agent_peak_rss_bytes, h.examples, "
                                "h.accuracy_before, h.accuracy FROM updates u LEFT JOIN holdouts h "
                                "ON h.task_id = u.task_id WHERE round = ? ORDER BY u.task_id", (round_no,)).fetchall()
        return [UpdateRow(*r) for r in rows]

    def recent_losses(self, round_no: int, rounds: int = 3) -> list[float]:
        """Training losses of the updates accepted in the last `rounds` rounds up to `round_no` (the fleet's range)."""
        rows = self._db.execute("SELECT loss FROM updates WHERE round > ? AND round <= ?",
                                (round_no - rounds, round_no)).fetchall()
        return [float(r[0]) for r in rows]

    def close_round(self, round_no: int, weights_after: str, strategy_state: dict, metrics: dict | None = None,
                    now: float | None = None, fence: tuple[str, str, int] | None = None) -> None:
        """Close a round: its new weights, the schedule after it, its metrics, and every unsettled task failed
        (refused with LeaseLost when `fence`, the leader's lease, is no longer held)."""
        with self._db.transaction():
            self._check_fence(fence)
            cur = self._db.execute(
                "UPDATE rounds SET state = 'closed', weights_after = ?, strategy_state = ?, closed_at = ?, metrics = ? "
                "WHERE round = ? AND state = 'open'",
                (weights_after, json.dumps(strategy_state), time.time() if now is None else now,
                 json.dumps(metrics or {}), round_no))
            if cur.rowcount != 1:
                raise ValueError(f"round {round_no} is not open")
            self._db.execute("UPDATE tasks SET status = 'failed', reason = COALESCE(reason, 'no update by the end "
                             "of the round') WHERE round = ? AND status = 'sent'", (round_no,))

    def closed_rounds(self) -> list[dict]:
        """Every closed and tested round's metrics, in order (what metrics.jsonl is written from)."""
        return [m for _, m in self.closed_rounds_after(0)]

    def record_test(self, round_no: int, metrics: dict, fence: tuple[str, str, int] | None = None) -> None:
        """A closed round's metrics once its new model has been tested (close_round stored them with TESTING)."""
        with self._db.transaction():
            self._check_fence(fence)
            cur = self._db.execute("UPDATE rounds SET metrics = ? WHERE round = ? AND state = 'closed'",
                                   (json.dumps(metrics), round_no))
            if cur.rowcount != 1:
                raise ValueError(f"round {round_no} is not closed")

    def untested_rounds(self) -> list[tuple[int, str, dict]]:
        """(round, weights after it, metrics so far) of the closed round whose model a coordinator stopped before
        testing, if any: a restart, or the next leader, tests it. Only the last closed round can be one (a round
        is tested before the next one closes), so only its metrics are read."""
        rows = self._db.execute("SELECT round, weights_after, metrics FROM rounds WHERE state = 'closed' "
                                "ORDER BY round DESC LIMIT 1").fetchall()
        return [(int(r), w, m) for r, w, m in ((r, w, json.loads(m or "{}")) for r, w, m in rows) if m.get(TESTING)]

    def claimed_examples(self, device_ids, before_round: int, last: int = 8) -> dict[str, list[int]]:
        """Each device's sample counts claimed in its last `last` answers before `before_round` (updates and
        scores): the history aggregation caps a new claim against (a device cannot jump its claim at once)."""
        out: dict[str, list[int]] = {}
        for d in device_ids:
            rows = self._db.execute(
                "SELECT num_examples FROM (SELECT round, num_examples FROM updates WHERE device_id = ? AND round < ? "
                "UNION ALL SELECT round, num_examples FROM scores WHERE device_id = ? AND round < ?) AS answers "
                "ORDER BY round DESC LIMIT ?", (d, before_round, d, before_round, last)).fetchall()
            out[d] = [int(r[0]) for r in rows]
        return out

    def closed_round_rows(self) -> list[RoundRow]:
        rows = self._db.execute("SELECT round, state, opened_at, deadline_at, weights_before, weights_after, plan, "
                                "strategy_state FROM rounds WHERE state = 'closed' ORDER BY round").fetchall()
        return [RoundRow(*r[:6], json.loads(r[6]), json.loads(r[7])) for r in rows]

    def record_rejection(self, device_id: str | None, task_id: str | None, reason: str, kind: str = "other") -> None:
        self.record_rejections([(time.time(), device_id, task_id, reason, kind)])

    def record_rejections(self, rows: list[tuple[float, str | None, str | None, str, str]]) -> None:
        """Many rejections (at, device, task, reason, kind) in one transaction: a flood of garbage costs one write
        per tick, not one each. Each kind's running total grows in the same transaction."""
        with self._db.transaction():
            self._db.executemany("INSERT INTO rejections (at, device_id, task_id, reason, kind) VALUES (?, ?, ?, ?, ?)",
                                 rows)
            totals = Counter(row[4] for row in rows)
            for kind in sorted(totals):   # one order for every replica: two flushing at once never deadlock
                self._db.execute("INSERT INTO rejection_totals (kind, total) VALUES (?, ?) ON CONFLICT(kind) DO "
                                 "UPDATE SET total = rejection_totals.total + excluded.total", (kind, totals[kind]))
            # the newest MAX_REJECTIONS are kept: a flood of garbage must not grow the store without end
            self._db.execute("DELETE FROM rejections WHERE id <= (SELECT MAX(id) FROM rejections) - ?",
                             (MAX_REJECTIONS,))

    def rejections(self, since: float = 0.0) -> list[dict]:
        """The stored rejections (the newest MAX_REJECTIONS) since `since`, oldest first."""
        cur = self._db.execute("SELECT at, device_id, task_id, reason, kind FROM rejections WHERE at >= ? "
                               "ORDER BY id", (since,))
        return [dict(zip(("at", "device_id", "task_id", "reason", "kind"), r)) for r in cur.fetchall()]

    def rejection_totals(self) -> dict[str, int]:
        """Rejections ever stored, per kind: running totals, whatever the trim of the table has dropped."""
        rows = self._db.execute("SELECT kind, total FROM rejection_totals ORDER BY kind").fetchall()
        return {kind: int(total) for kind, total in rows}

    # -- what monitoring reads (coordinator/observe/prometheus.py) ----------------------------------------
    def fleet_totals(self) -> dict[str, int]:
        """The run's totals in a few aggregate queries (none reads a round's JSON): rounds closed, the newest
        round and whether it is open, answers accepted (updates and scores) with the bytes the updates' devices
        uploaded and downloaded, and tasks failed."""
        closed, newest = self._db.execute("SELECT COUNT(*), MAX(round) FROM rounds WHERE state = 'closed'").fetchone()
        last = self._db.execute("SELECT round, state FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        updates, uploaded, downloaded = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(blob_size), 0), COALESCE(SUM(downloaded_bytes), 0) FROM updates").fetchone()
        scores = self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0]
        failed = self._db.execute("SELECT COUNT(*) FROM tasks WHERE status = 'failed'").fetchone()[0]
        return {"rounds_closed": int(closed), "last_closed_round": int(newest or 0),
                "round": int(last[0]) if last else 0, "round_open": int(bool(last) and last[1] == "open"),
                "accepted": int(updates) + int(scores), "uploaded_bytes": int(uploaded),
                "downloaded_bytes": int(downloaded), "tasks_failed": int(failed)}

    def devices_per_tier(self) -> dict[str, tuple[int, int]]:
        """{tier: (devices online, devices registered)}."""
        rows = self._db.execute("SELECT tier, SUM(online), COUNT(*) FROM devices GROUP BY tier ORDER BY tier")
        return {tier: (int(online or 0), int(registered)) for tier, online, registered in rows.fetchall()}

    def closed_rounds_after(self, round_no: int) -> list[tuple[int, dict]]:
        """(round, metrics) of the closed and tested rounds after `round_no`, in order: what a reader that has folded
        the earlier ones still needs."""
        rows = self._db.execute("SELECT round, metrics FROM rounds WHERE state = 'closed' AND round > ? ORDER BY round",
                                (round_no,)).fetchall()
        out = []
        for r, m in rows:
            metrics = json.loads(m or "{}")
            if metrics.get(TESTING):
                break           # its model is still being tested: it and every round after it come later
            out.append((int(r), metrics))
        return out
