"""Coordinator replicas: several processes serve one fleet from one PostgreSQL state store.

Every replica takes device messages (the broker shares the device topics among them: MQTT 5
shared subscriptions) and records accepted updates in the store, where a task's update counts
once whichever replica took it. One replica at a time leads: it plans, opens and closes rounds,
aggregates and evaluates. It leads while it holds a lease in the store, renewed from a thread of
its own so that a long aggregation does not lose it; when it dies the lease runs out and another
replica takes over from the store. Each change of leader raises the lease's epoch, and the
leader's round writes name the epoch they were planned under (a fence): a leader that paused
past its lease cannot open or close a round over its successor.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

from coordinator.config import ConfigError
from coordinator.state_sql import StoreError

log = logging.getLogger("edge-coordinator")

LEASE = "leader"                          # the lease's name in the store
MAX_STALL_S = 600.0   # a leader whose loop has not ticked for this long (hung) stops renewing its lease


def replica_name(given: str) -> str:
    """This replica's name in the lease and its MQTT client id: given, or host-pid (unique while it runs)."""
    name = given or f"{socket.gethostname()}-{os.getpid()}"
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
        raise ConfigError(f"service.replica {given!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
    return name


def link_identity(service: dict) -> tuple[str, int | None]:
    """The broker client id and session expiry of this coordinator ([service] settings): one coordinator has the
    fleet's id and a persistent session (None: the link's default); a replica has an id of its own and no session
    kept after it disconnects, so the broker hands its share of the messages to the other replicas at once."""
    from coordinator.state_sql import is_database_url
    fleet = service["fleet"]
    if not is_database_url(service["state"]):
        return f"edge-coordinator-{fleet}", None
    return f"edge-coordinator-{fleet}-{replica_name(service['replica'])}", 0


def share_group(store) -> str:
    """The name of the replicas' shared-subscription group: drawn once per run and kept in the store they share.

    Mosquitto's ACL checks deliveries, not subscriptions: a device that joined the group would be handed a share
    of every device's messages and refused them, and they would be lost. A name no device is ever told keeps
    them out."""
    import secrets
    return store.meta_setdefault("share_group", f"edgeblock-{secrets.token_hex(8)}")


def shared(topic_filter: str, group: str) -> str:
    """A device topic filter as the replicas subscribe to it: the broker hands each message to one of them."""
    return f"$share/{group}/{topic_filter}"


class LeaderLease:
    """The leader lease, held for this replica by a thread with its own connection to the store."""

    def __init__(self, location: str | Path, replica: str, ttl_s: float):
        from coordinator.state_store import StateStore
        if not 1.0 <= ttl_s <= 3600:
            raise ConfigError(f"service.lease_s must be between 1 and 3600 seconds, not {ttl_s}")
        self.store = StateStore(location)
        self.replica, self.ttl_s = replica, ttl_s
        self._epoch: int | None = None
        self._held_until = 0.0          # monotonic: when this replica's hold runs out, as far as it knows
        self._ticked = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="leader-lease", daemon=True)

    def start(self) -> "LeaderLease":
        self._renew()
        self._thread.start()
        return self

    def tick(self) -> None:
        """The service's loop is alive (a hung loop must not keep the fleet's lead)."""
        self._ticked = time.monotonic()

    def epoch(self) -> int | None:
        """The epoch this replica leads in, or None while it does not lead."""
        return self._epoch if time.monotonic() < self._held_until else None

    def fence(self) -> tuple[str, str, int] | None:
        epoch = self.epoch()
        return None if epoch is None else (LEASE, self.replica, epoch)

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            if time.monotonic() - self._ticked > MAX_STALL_S:
                if self._epoch is not None:
                    log.error("replica %s: the service loop has not ticked for %.0f s; letting the lease go",
                              self.replica, MAX_STALL_S)
                self._epoch = None
                continue
            self._renew()

    def _renew(self) -> None:
        started = time.monotonic()
        try:
            epoch = self.store.hold_lease(LEASE, self.replica, self.ttl_s)
        except (StoreError, OSError, Exception) as exc:   # a lost database connection: not leading any more
            log.warning("replica %s: cannot renew the leader lease: %s", self.replica, exc)
            epoch = None
        if epoch is not None:
            self._held_until = started + self.ttl_s
        self._epoch = epoch

    def release(self) -> None:
        """Stop renewing; hand the lease over at once if held (a clean stop)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.ttl_s)
        if self._epoch is not None:
            try:
                self.store.release_lease(LEASE, self.replica)
            except Exception as exc:
                log.warning("replica %s: could not release the lease (it runs out in %.0f s): %s",
                            self.replica, self.ttl_s, exc)
        self._epoch = None
        self.store.close()
