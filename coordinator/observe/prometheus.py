"""The coordinator's metrics for Prometheus: GET /metrics in the text exposition format (version 0.0.4).

Every value is read from the state store when it is scraped, over a read-only connection of the
exporter's own, so it says what metrics.jsonl and the store say; every replica sharing one
PostgreSQL store reports the same fleet-wide numbers (only `edgeblock_coordinator_leader` is the
replica's own). A scrape is a few aggregate queries; the closed rounds' JSON (durations, the last
round's peaks and accuracy) is read once per newly closed round and folded into a cache. The
server is stdlib http.server in daemon threads: a scrape never runs in, waits for or takes down
the coordinator's loop; one that fails answers 500 and logs a warning. The metric names, their
types and labels are listed in docs/operator-guide.md ("Metrics for monitoring").
"""
from __future__ import annotations

import logging
import math
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable, Mapping

from coordinator.config import ConfigError
from coordinator.guards import REJECTION_KINDS
from coordinator.observe.run_data import parse_round
from coordinator.state_store import StateStore
from edge_runtime import __version__

log = logging.getLogger("edge-coordinator")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# round durations, seconds: an honest CI round takes 5-30 s, a round that waits for its deadline 600 s by default
DURATION_BUCKETS = (5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


# -- the exposition format ---------------------------------------------------------------------------
@dataclass
class Family:
    """One metric: its name, type, help text and samples (name suffix, labels, value)."""
    name: str
    type: str                          # counter | gauge | histogram
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def __post_init__(self):
        if not NAME.fullmatch(self.name):
            raise ValueError(f"{self.name!r} is not a Prometheus metric name")
        if self.type == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name} must end in _total")

    def add(self, value: float, suffix: str = "", **labels: str) -> "Family":
        bad = [k for k in labels if not LABEL.fullmatch(k) or k.startswith("__")]
        if bad:
            raise ValueError(f"{bad} are not Prometheus label names")
        self.samples.append((suffix, labels, value))
        return self


def escape_label(value: str) -> str:
    """A label value as the text format quotes it: backslash, double quote and line feed escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def exposition(families: Iterable[Family]) -> str:
    """The families in the text exposition format 0.0.4: # HELP, # TYPE, then one line per sample."""
    lines = []
    for f in families:
        lines += [f"# HELP {f.name} {_escape_help(f.help)}", f"# TYPE {f.name} {f.type}"]
        for suffix, labels, value in f.samples:
            text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
            lines.append(f"{f.name}{suffix}{{{text}}} {_number(value)}" if text else
                         f"{f.name}{suffix} {_number(value)}")
    return "\n".join(lines) + "\n"


# -- what the store says --------------------------------------------------------------------------
@dataclass
class ClosedRounds:
    """What the closed rounds' metrics add up to, folded in once per round (a closed round never changes)."""
    count: int = 0                     # rounds folded
    last_round: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    timed: int = 0                     # rounds with both times (those of very old runs may lack them)
    seconds: float = 0.0
    last_seconds: float | None = None
    last_accuracy: float | None = None
    job_peaks: dict[str, int] = field(default_factory=dict)     # tier -> max over the last round's answers
    agent_peaks: dict[str, int] = field(default_factory=dict)

    def fold(self, round_no: int, raw: Mapping) -> None:
        self.count, self.last_round = self.count + 1, round_no
        m = parse_round(raw)
        self.last_seconds = self.last_accuracy = None
        self.job_peaks, self.agent_peaks = {}, {}
        if m is None:                  # a round closed without metrics: counted, nothing to read
            return
        if m.seconds is not None:
            self.timed += 1
            self.seconds += m.seconds
            self.last_seconds = m.seconds
            for i, bound in enumerate(DURATION_BUCKETS):
                self.buckets[i] += m.seconds <= bound
        self.last_accuracy = m.accuracy
        for d in m.devices.values():
            if d.peak_rss_bytes is not None:
                self.job_peaks[d.tier] = max(self.job_peaks.get(d.tier, 0), d.peak_rss_bytes)
            if d.agent_peak_rss_bytes is not None:
                self.agent_peaks[d.tier] = max(self.agent_peaks.get(d.tier, 0), d.agent_peak_rss_bytes)


class FleetMetrics:
    """The metric families of a run, read from its state store (location) at each scrape."""

    def __init__(self, location: Path | str, leads: Callable[[], bool], version: str):
        self.location, self.leads, self.version = location, leads, version
        self._store: StateStore | None = None
        self._rounds = ClosedRounds()
        self._lock = threading.Lock()  # one scrape at a time: the connection and the cache are shared

    def scrape(self) -> str:
        with self._lock:
            try:
                return exposition(self._families())
            except Exception:
                self.close()           # a broken connection (a database restart) is opened again next time
                raise

    def close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            try:
                store.close()
            except Exception:          # closing what already broke
                pass

    def _families(self) -> list[Family]:
        if self._store is None:
            self._store = StateStore(self.location, readonly=True)
        store = self._store
        totals = store.fleet_totals()
        if totals["rounds_closed"] < self._rounds.count or totals["last_closed_round"] < self._rounds.last_round:
            self._rounds = ClosedRounds()          # another run's store at this location: start over
        if totals["rounds_closed"] != self._rounds.count:
            for round_no, raw in store.closed_rounds_after(self._rounds.last_round):
                self._rounds.fold(round_no, raw)
        rounds, rejected, tiers = self._rounds, store.rejection_totals(), store.devices_per_tier()

        out = [Family("edgeblock_build_info", "gauge", "The edgeblock release serving these metrics (always 1).")
               .add(1, version=self.version),
               Family("edgeblock_coordinator_leader", "gauge",
                      "1 when this coordinator replica leads the fleet (plans, aggregates), 0 when it follows; a "
                      "single coordinator always leads.").add(int(bool(self.leads()))),
               Family("edgeblock_rounds_closed_total", "counter", "Rounds closed (the lines of metrics.jsonl).")
               .add(rounds.count),
               Family("edgeblock_current_round", "gauge", "The newest round's number (0 before the first opens).")
               .add(totals["round"]),
               Family("edgeblock_round_open", "gauge", "1 while the newest round is open, collecting updates.")
               .add(totals["round_open"]),
               Family("edgeblock_updates_accepted_total", "counter",
                      "Updates (and score tasks' answers) accepted and stored, over every round.")
               .add(totals["accepted"]),
               Family("edgeblock_tasks_failed_total", "counter",
                      "Tasks that ended without an answer: the device reported it could not train, went offline, "
                      "or missed the deadline.").add(totals["tasks_failed"])]
        kinds = Family("edgeblock_rejections_total", "counter",
                       f"Messages refused, by kind of refusal ({', '.join(REJECTION_KINDS)}; "
                       f"docs/operator-guide.md says what each means).")
        for kind in [*REJECTION_KINDS, *sorted(set(rejected) - set(REJECTION_KINDS))]:
            kinds.add(rejected.get(kind, 0), kind=kind)
        online = Family("edgeblock_devices_online", "gauge", "Devices online now, per tier.")
        registered = Family("edgeblock_devices_registered", "gauge", "Devices that ever said hello, per tier.")
        for tier, (n_online, n_registered) in tiers.items():
            online.add(n_online, tier=tier)
            registered.add(n_registered, tier=tier)
        durations = Family("edgeblock_round_duration_seconds", "histogram",
                           "Closed rounds' durations, from opening to closing.")
        for bound, n in zip(DURATION_BUCKETS, rounds.buckets):
            durations.add(n, "_bucket", le=_number(bound))
        durations.add(rounds.timed, "_bucket", le="+Inf").add(rounds.seconds, "_sum").add(rounds.timed, "_count")
        out += [kinds, online, registered, durations,
                Family("edgeblock_uploaded_bytes_total", "counter",
                       "Bytes of the update blobs accepted from devices.").add(totals["uploaded_bytes"]),
                Family("edgeblock_downloaded_bytes_total", "counter",
                       "Bytes the devices downloaded for the tasks whose updates were accepted (as they reported "
                       "them).").add(totals["downloaded_bytes"])]
        last = [Family("edgeblock_last_round_duration_seconds", "gauge", "The last closed round's duration."),
                Family("edgeblock_last_round_test_accuracy_ratio", "gauge",
                       "The global model's accuracy on the coordinator's test set after the last closed round "
                       "(0 to 1).")]
        if rounds.last_seconds is not None:
            last[0].add(rounds.last_seconds)
        if rounds.last_accuracy is not None:
            last[1].add(rounds.last_accuracy)
        job = Family("edgeblock_last_round_job_peak_bytes", "gauge",
                     "The largest peak RSS of a training job in the last closed round, per tier.")
        agent = Family("edgeblock_last_round_agent_peak_bytes", "gauge",
                       "The largest peak RSS of a device agent (beside its job) in the last closed round, per tier.")
        for tier, peak in sorted(rounds.job_peaks.items()):
            job.add(peak, tier=tier)
        for tier, peak in sorted(rounds.agent_peaks.items()):
            agent.add(peak, tier=tier)
        return out + last + [job, agent]


# -- the endpoint ----------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    server_version, sys_version = "edgeblock-metrics", ""
    timeout = 10.0                     # a client that stalls mid-request loses its thread, not the server

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._answer(404, "not found: the metrics are at /metrics\n")
            return
        try:
            body = self.server.metrics.scrape()
        except Exception as exc:       # a store that cannot be read: the scraper sees 500, the log says why
            log.warning("a /metrics scrape failed: %s: %s", type(exc).__name__, exc)
            self._answer(500, f"the state store could not be read: {type(exc).__name__}\n")
            return
        self._answer(200, body, CONTENT_TYPE)

    def _answer(self, status: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        log.debug("metrics endpoint: %s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    metrics: FleetMetrics


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsServer:
    """GET /metrics on `listen` ("HOST:PORT"; port 0 takes a free one), served from daemon threads."""

    def __init__(self, listen: str, location: Path | str, leads: Callable[[], bool]):
        host, port = parse_listen(listen)
        try:
            self._httpd = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        except OSError as exc:
            raise ConfigError(f"service.metrics_listen {listen}: cannot listen there ({exc.strerror or exc}); "
                              f"give a free port on an address of this machine, or \"\" to serve no metrics") \
                from None
        self._httpd.metrics = self.metrics = FleetMetrics(location, leads, __version__)
        self.address: tuple[str, int] = self._httpd.server_address[:2]   # the port actually bound
        self.url = f"http://{f'[{self.address[0]}]' if ':' in self.address[0] else self.address[0]}:" \
                   f"{self.address[1]}/metrics"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("Prometheus metrics at %s", self.url)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self.metrics.close()


def parse_listen(listen: str) -> tuple[str, int]:
    """("HOST", PORT) of a "HOST:PORT" setting ("[::1]:9464" for an IPv6 address); ConfigError naming it if not."""
    host, colon, port = listen.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ConfigError(f"service.metrics_listen {listen!r}: give HOST:PORT (e.g. 127.0.0.1:9464; port 0 takes any "
                          f"free port), or \"\" to serve no metrics")
    return host, int(port)


def serve(listen: str, location: Path | str, leads: Callable[[], bool]) -> MetricsServer | None:
    """The endpoint [service] metrics_listen asks for, serving the store at `location`; None when it is ""."""
    return MetricsServer(listen, location, leads) if listen else None


def stop(server: MetricsServer | None) -> None:
    if server is not None:
        server.stop()
