"""The coordinator's /metrics endpoint: the text exposition format, the values a real store holds (SQLite and a
real PostgreSQL), and a real coordinator with real devices over a real Mosquitto, scraped over HTTP during and
after two rounds and compared with metrics.jsonl and the state store, malformed messages counted by kind."""
from __future__ import annotations

import hashlib
import logging
import re
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from fleet_helpers import BIG_MB, LocalFleet, Rogue, read_metrics, settings, wait_for
from test_state_store import location  # noqa: F401  (SQLite, and a database on a real PostgreSQL server)

from coordinator.config import ConfigError
from coordinator.guards import REJECTION_KINDS
from coordinator.local.data import write_fleet_data
from coordinator.local.fleet import DeviceSpec, wait_until
from coordinator.observe.prometheus import DURATION_BUCKETS, Family, MetricsServer, exposition, parse_listen, serve
from coordinator.ops.broker import EmbeddedBroker
from coordinator.round_metrics import DeviceRound, RoundMetrics
from coordinator.state_store import StateStore
from edge_runtime import __version__
from edge_runtime.wire.mqtt_link import MqttLink
from edge_runtime.wire.protocol import Fetch, Hello, Status, Topics, Update
from edge_runtime.wire.transfer import ChunkHeader

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


# -- reading the exposition as a scraper does ------------------------------------------------------------------
class Scrape:
    """The text format parsed, strictly: every sample belongs to a family announced by # HELP and # TYPE."""

    def __init__(self, text: str):
        self.text, self.types, self.helps, self.samples = text, {}, {}, {}
        assert text.endswith("\n"), "the exposition must end with a line feed"
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, help_text = line[7:].partition(" ")
                assert NAME.fullmatch(name) and name not in self.helps, line
                self.helps[name] = help_text
            elif line.startswith("# TYPE "):
                name, _, kind = line[7:].partition(" ")
                assert name in self.helps and name not in self.types and kind in TYPES, line
                self.types[name] = kind
            else:
                match = SAMPLE.fullmatch(line)
                assert match, f"not a sample line: {line!r}"
                name, labels, value = match.groups()
                family = self._family(name)
                assert family in self.types, f"{name} comes before its # TYPE line"
                key = (name, tuple(sorted(self._labels(labels or "").items())))
                assert key not in self.samples, f"{line!r} repeats a series"
                self.samples[key] = float(value)
        for name, kind in self.types.items():
            assert kind != "counter" or name.endswith("_total"), f"counter {name} does not end in _total"

    def _family(self, name: str) -> str:
        for suffix in ("_bucket", "_sum", "_count"):
            base = name[:-len(suffix)]
            if name.endswith(suffix) and self.types.get(base) == "histogram":
                return base
        return name

    @staticmethod
    def _labels(text: str) -> dict[str, str]:
        out, at = {}, 0
        while at < len(text):
            match = PAIR.match(text, at)
            assert match, f"bad labels {text!r} at {at}"
            out[match.group(1)] = re.sub(r'\\[\\"n]', lambda m: UNESCAPE[m.group(0)], match.group(2))
            at = match.end()
        return out

    def value(self, name: str, **labels: str) -> float:
        return self.samples[(name, tuple(sorted(labels.items())))]

    def by(self, name: str, label: str) -> dict[str, float]:
        """{label value: sample} of a family with one label."""
        return {dict(k)[label]: v for (n, k), v in self.samples.items() if n == name}


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=30) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return Scrape(answer.read().decode())


# -- the format ----------------------------------------------------------------------------------------------
def test_the_exposition_has_help_and_type_lines_escapes_label_values_and_takes_only_valid_names():
    nasty = 'a "quoted" back\\slash\nand a new line'
    text = exposition([
        Family("edgeblock_things_total", "counter", "Things.\nOn two lines, with a \\ too.").add(3, kind=nasty)
        .add(0, kind="plain"),
        Family("edgeblock_ratio", "gauge", "A ratio.").add(float("nan")),
        Family("edgeblock_wait_seconds", "histogram", "Waits.").add(1, "_bucket", le="1.0")
        .add(2, "_bucket", le="+Inf").add(2.5, "_sum").add(2, "_count")])
    assert text.splitlines()[:3] == ["# HELP edgeblock_things_total Things.\\nOn two lines, with a \\\\ too.",
                                     "# TYPE edgeblock_things_total counter",
                                     'edgeblock_things_total{kind="a \\"quoted\\" back\\\\slash\\nand a new line"} 3']
    parsed = Scrape(text)
    assert parsed.by("edgeblock_things_total", "kind") == {nasty: 3, "plain": 0}    # the value read back whole
    assert parsed.types == {"edgeblock_things_total": "counter", "edgeblock_ratio": "gauge",
                            "edgeblock_wait_seconds": "histogram"}
    assert str(parsed.value("edgeblock_ratio")) == "nan" and parsed.value("edgeblock_wait_seconds_count") == 2
    for bad in ("edgeblock-things", "0things", "edgeblock things", ""):
        with pytest.raises(ValueError, match="not a Prometheus metric name"):
            Family(bad, "gauge", "x")
    with pytest.raises(ValueError, match="must end in _total"):
        Family("edgeblock_things", "counter", "x")
    with pytest.raises(ValueError, match="not Prometheus label names"):
        Family("edgeblock_x", "gauge", "x").add(1, **{"__name": "y"})


def test_metrics_listen_takes_host_port_and_refuses_anything_else_clearly(tmp_path):
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464) and parse_listen("[::1]:0") == ("::1", 0)
    assert serve("", tmp_path / "state.db", lambda: True) is None           # the default: no endpoint
    for bad in ("9464", "127.0.0.1", "127.0.0.1:", ":9464", "localhost:http", "127.0.0.1:70000", "127.0.0.1:-1"):
        with pytest.raises(ConfigError, match=re.escape(f"service.metrics_listen {bad!r}: give HOST:PORT")):
            parse_listen(bad)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: cannot listen there .*Address already in use"):
            MetricsServer(f"127.0.0.1:{port}", tmp_path / "state.db", lambda: True)
    with pytest.raises(ConfigError, match="cannot listen there"):
        MetricsServer("203.0.113.9:0", tmp_path / "state.db", lambda: True)     # not an address of this machine


def test_the_operator_guide_lists_every_metric_and_every_rejection_kind(tmp_path):
    from coordinator.observe.prometheus import FleetMetrics
    StateStore(tmp_path / "state.db").close()
    served = Scrape(FleetMetrics(tmp_path / "state.db", lambda: True, __version__).scrape())
    guide = (Path(__file__).resolve().parents[1] / "docs" / "operator-guide.md").read_text()
    section = guide.split("## Metrics for monitoring", 1)[1].split("\n## ", 1)[0]
    metrics = dict(re.findall(r"^\| `(edgeblock_\w+)` \| (\w+) \|", section, re.M))
    kinds = re.findall(r"^\| `(?!edgeblock_)(\w+)` \| ", section, re.M)
    assert metrics == served.types, "the guide's table of metrics differs from what /metrics serves"
    assert kinds == list(REJECTION_KINDS) == list(served.by("edgeblock_rejections_total", "kind"))


# -- what a store holds, on SQLite and PostgreSQL ------------------------------------------------------------------
def _round_metrics(round_no: int, opened: float, seconds: float, devices: dict) -> dict:
    return RoundMetrics(round=round_no, accuracy=0.5 + round_no / 100, opened_at=opened, closed_at=opened + seconds,
                        updates=sum(d.accepted for d in devices.values()), devices=devices).to_dict()


def test_a_scrape_reads_the_store_and_two_replicas_report_the_same_fleet(location, caplog):  # noqa: F811
    leader = MetricsServer("127.0.0.1:0", location, lambda: True)
    try:
        # no store there yet (no file; a database with no schema): 500 and a warning, never a crash
        with caplog.at_level(logging.WARNING, "edge-coordinator"):
            with pytest.raises(urllib.error.HTTPError, match="500"):
                urllib.request.urlopen(leader.url, timeout=30)
        assert "a /metrics scrape failed: StoreError" in caplog.text
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(leader.url.replace("/metrics", "/"), timeout=30)
    except BaseException:
        leader.stop()
        raise

    s = StateStore(location)
    for device, tier in (("pi-01", "pi-zero-2w"), ("pi-02", "pi-zero-2w"), ("big-1", "odd-tier")):
        s.upsert_device(Hello(device, tier, 300 << 20, "0.1.0", 4, 10 ** 9))
    s.set_online("pi-02", False)
    s.open_round(1, 1e12, "ab" * 32, {}, {}, [(f"r1-{d}", d, {}) for d in ("pi-01", "pi-02", "big-1")], now=100.0)
    for d, size in (("pi-01", 1000), ("big-1", 3000)):
        s.record_update(Update(f"r1-{d}", 1, d, "cd" * 32, size, 10, 0.5, 10, 100 << 20, 3.0,
                               downloaded_bytes=7 * size))
    s.mark_task("r1-pi-02", "failed", "device went offline")
    s.record_rejections([(1.0, None, None, "garbage", "malformed")] * 2
                        + [(2.0, "pi-01", "r1-pi-01", "NaN", "bad_update")])
    devices = {"pi-01": DeviceRound(tier="pi-zero-2w", status="accepted", peak_rss_bytes=90 << 20,
                                    agent_peak_rss_bytes=40 << 20, uploaded_bytes=1000, downloaded_bytes=7000),
               "pi-02": DeviceRound(tier="pi-zero-2w", status="failed"),
               "big-1": DeviceRound(tier="odd-tier", status="accepted", peak_rss_bytes=200 << 20,
                                    agent_peak_rss_bytes=45 << 20, uploaded_bytes=3000, downloaded_bytes=21000)}
    s.close_round(1, "ef" * 32, {}, metrics=_round_metrics(1, 100.0, 42.5, devices))
    s.open_round(2, 1e12, "ef" * 32, {}, {}, [("r2-pi-01", "pi-01", {})], now=200.0)

    follower = MetricsServer("127.0.0.1:0", location, lambda: False)    # a second replica
    try:
        a, b = scrape(leader.url), scrape(follower.url)          # the leader's endpoint has opened the store now
        assert a.value("edgeblock_coordinator_leader") == 1 and b.value("edgeblock_coordinator_leader") == 0
        assert {k: v for k, v in a.samples.items() if k[0] != "edgeblock_coordinator_leader"} == \
            {k: v for k, v in b.samples.items() if k[0] != "edgeblock_coordinator_leader"}
        assert a.value("edgeblock_build_info", version=__version__) == 1
        assert (a.value("edgeblock_rounds_closed_total"), a.value("edgeblock_current_round"),
                a.value("edgeblock_round_open")) == (1, 2, 1)
        assert (a.value("edgeblock_updates_accepted_total"), a.value("edgeblock_tasks_failed_total")) == (2, 1)
        assert (a.value("edgeblock_uploaded_bytes_total"), a.value("edgeblock_downloaded_bytes_total")) == \
            (4000, 28000)
        assert a.by("edgeblock_rejections_total", "kind") == {**{k: 0 for k in REJECTION_KINDS}, "malformed": 2,
                                                              "bad_update": 1}
        assert a.by("edgeblock_devices_online", "tier") == {"pi-zero-2w": 1, "odd-tier": 1}
        assert a.by("edgeblock_devices_registered", "tier") == {"pi-zero-2w": 2, "odd-tier": 1}
        assert a.by("edgeblock_last_round_job_peak_bytes", "tier") == {"pi-zero-2w": 90 << 20, "odd-tier": 200 << 20}
        assert a.by("edgeblock_last_round_agent_peak_bytes", "tier") == {"pi-zero-2w": 40 << 20, "odd-tier": 45 << 20}
        assert a.value("edgeblock_last_round_test_accuracy_ratio") == 0.51
        assert a.value("edgeblock_last_round_duration_seconds") == 42.5
        assert a.by("edgeblock_round_duration_seconds_bucket", "le") == \
            {**{repr(b): int(42.5 <= b) for b in DURATION_BUCKETS}, "+Inf": 1}
        assert (a.value("edgeblock_round_duration_seconds_sum"), a.value("edgeblock_round_duration_seconds_count")) \
            == (42.5, 1)
        # round 2 closes: the next scrape folds in that round alone
        s.record_update(Update("r2-pi-01", 2, "pi-01", "cd" * 32, 500, 10, 0.4, 10, 95 << 20, 3.0))
        s.close_round(2, "01" * 32, {}, metrics=_round_metrics(2, 200.0, 7.0, {"pi-01": DeviceRound(
            tier="pi-zero-2w", status="accepted", peak_rss_bytes=95 << 20, uploaded_bytes=500)}))
        s.record_rejection(None, None, "garbage", "malformed")
        after = scrape(follower.url)
        assert (after.value("edgeblock_rounds_closed_total"), after.value("edgeblock_round_open")) == (2, 0)
        assert after.value("edgeblock_updates_accepted_total") == 3 and after.value("edgeblock_uploaded_bytes_total") \
            == 4500
        assert after.value("edgeblock_rejections_total", kind="malformed") == 3
        assert after.by("edgeblock_last_round_job_peak_bytes", "tier") == {"pi-zero-2w": 95 << 20}
        assert after.by("edgeblock_last_round_agent_peak_bytes", "tier") == {}         # none reported it
        assert (after.value("edgeblock_round_duration_seconds_sum"),
                after.value("edgeblock_round_duration_seconds_count"),
                after.value("edgeblock_round_duration_seconds_bucket", le="5.0"),
                after.value("edgeblock_round_duration_seconds_bucket", le="10.0")) == (49.5, 2, 0, 1)
        assert after.value("edgeblock_last_round_test_accuracy_ratio") == 0.52
    finally:
        leader.stop()
        follower.stop()
    with pytest.raises(urllib.error.URLError):          # stopped: the port is closed
        urllib.request.urlopen(leader.url, timeout=5)


# -- a real coordinator, real devices, a real Mosquitto ----------------------------------------------------------
FLEET = "metrics"
ROGUE_BUDGET = 240 << 20     # what an honest BIG_MB agent announces: room for the whole model (FedAvg)
GRACE_S = 30.0               # the rogue announces it goes offline before its round-2 answer; this long to send it


def _store(work: Path) -> StateStore:
    return StateStore(work / "state.db", readonly=True)


def _registered(fleet, client: Rogue, hello: bytes) -> None:
    """Wait until a hand-made device is in the registry, saying hello again if the first one went unheard."""
    for _ in range(12):
        if wait_until(lambda: _store(fleet.work).has_device(client.id), 5):
            return
        client.link.publish(fleet.topics.device(client.id, "hello"), hello)
    raise TimeoutError(f"{client.id} was never registered:\n{fleet.local.log_tail('coordinator')}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A coordinator (FedAvg, 3 rounds planned) serving /metrics on a free port, two honest agents and `rogue`, a
    client speaking the protocol by hand, without which no round opens (min_devices 3): it leaves in round 2, so
    after that round the coordinator stays up, idle, for the scrapes after the run."""
    from coordinator.model.zoo_profile import measured_profile
    root = tmp_path_factory.mktemp("metrics")
    measured_profile(root, "fmnist_cnn", [32, 64])
    dirs = write_fleet_data(root / "data", ["d0", "d1"], samples=900, alpha=50.0)
    work = root / "fleet" / "coordinator"
    config = settings(work, root / "profile.json", "fedavg", min_devices=3, round_deadline_s=120.0,
                      offline_grace_s=GRACE_S, eval_samples=500, max_rounds=3, metrics_listen="127.0.0.1:0")
    config["fedavg"]["rounds"] = 3
    with EmbeddedBroker(root / "broker") as broker, LocalFleet(root / "fleet", broker.url, FLEET) as local:
        local.start_coordinator(config)
        said = wait_for(lambda: re.search(r"Prometheus metrics at (http://\S+/metrics)", local.log_tail("coordinator")),
                        300, "the coordinator to serve /metrics", local)
        f = SimpleNamespace(root=root, work=work, broker=broker, local=local, topics=Topics(FLEET), url=said.group(1))
        f.rogue = Rogue(broker, FLEET, "rogue", root / "rogue", tier="a-rogue", budget_bytes=ROGUE_BUDGET)
        f.vandal = MqttLink("metrics-vandal", broker.host, broker.port, []).start()
        try:
            _registered(f, f.rogue, Hello("rogue", "a-rogue", ROGUE_BUDGET, "rogue").encode())
            for d in ("d0", "d1"):
                local.start_device(DeviceSpec(d, "pi-zero-2w", BIG_MB, dirs[d]))
            yield f
        finally:
            f.vandal.stop()
            f.rogue.link.stop()


def _tiers(store: StateStore) -> tuple[dict, dict]:
    tiers = store.devices_per_tier()
    return {t: n for t, (n, _) in tiers.items()}, {t: n for t, (_, n) in tiers.items()}


def test_metrics_during_a_round_say_what_the_store_says_and_count_refusals_by_kind(fleet):
    task = fleet.rogue.task()
    assert task.round == 1
    during = scrape(fleet.url)                   # round 1 is open until the rogue answers
    assert (during.value("edgeblock_current_round"), during.value("edgeblock_round_open"),
            during.value("edgeblock_rounds_closed_total"), during.value("edgeblock_coordinator_leader")) == (1, 1, 0, 1)
    assert during.value("edgeblock_build_info", version=__version__) == 1
    online, registered = _tiers(_store(fleet.work))
    assert registered == {"a-rogue": 1, "pi-zero-2w": 2}
    assert during.by("edgeblock_devices_online", "tier") == online
    assert during.by("edgeblock_devices_registered", "tier") == registered
    before = during.by("edgeblock_rejections_total", "kind")
    assert set(before) == set(REJECTION_KINDS) and before == {k: _store(fleet.work).rejection_totals().get(k, 0)
                                                             for k in REJECTION_KINDS}

    # refusals of four kinds, from a registered device and from ids the registry does not hold
    vandal, topics = fleet.vandal, fleet.topics
    vandal.publish(topics.device("rogue", "update"), b"{not json")                        # malformed
    vandal.publish(topics.device("nobody", "hello"), b"[" * 5000 + b"]" * 5000)           # malformed
    blob, half = b"x" * 40_000, 20_000
    header = ChunkHeader(hashlib.sha256(blob).hexdigest(), 0, 2, 0, len(blob), hashlib.sha256(blob[:half]).hexdigest())
    vandal.publish(topics.device("idler", "upload"), blob[:half], user_properties=header.to_properties())  # unsolicited
    vandal.publish(topics.device("idler", "fetch"), Fetch("a" * 64).encode())            # unsolicited
    values = fleet.rogue.trained_values(task)
    unknown = fleet.rogue.send(task, values, task_id="r9-nosuchtask")                     # unknown_task
    assert unknown is not None and not unknown.accepted and "unknown task" in unknown.reason
    forged = fleet.rogue.send(task, values, device_id="d0")                               # wrong_identity
    assert forged is not None and not forged.accepted and "sent on the topic of device" in forged.reason
    sent = {"malformed": 2, "unsolicited": 2, "unknown_task": 1, "wrong_identity": 1}
    expected = {k: n + sent.get(k, 0) for k, n in before.items()}
    counted = wait_for(lambda: (now := scrape(fleet.url).by("edgeblock_rejections_total", "kind")) == expected and now,
                       60, f"the rejections to be counted: {expected}", fleet.local)
    assert counted == {k: _store(fleet.work).rejection_totals().get(k, 0) for k in REJECTION_KINDS}
    with sqlite3.connect(f"{(fleet.work / 'state.db').as_uri()}?mode=ro", uri=True) as db:   # the stored rows too
        rows = dict(db.execute("SELECT kind, COUNT(*) FROM rejections GROUP BY kind").fetchall())
    assert rows == {k: n for k, n in counted.items() if n}

    ack = fleet.rogue.send(task, values)         # and round 1 goes on: the rogue's own update is taken
    assert ack is not None and ack.accepted, ack


def test_metrics_after_two_rounds_equal_the_metrics_file_and_the_store(fleet):
    task = fleet.rogue.task(after_round=1, timeout_s=300)
    assert task.round == 2
    # the rogue leaves (so that no third round opens), then answers within the offline grace
    fleet.rogue.link.publish(fleet.topics.device("rogue", "status"), Status("offline", time.time()).encode(),
                             retain=True)
    wait_for(lambda: not any(d["device_id"] == "rogue" for d in _store(fleet.work).devices(online_only=True)), 30,
             "the rogue to be offline", fleet.local)
    ack = fleet.rogue.send(task, fleet.rogue.trained_values(task))
    assert ack is not None and ack.accepted, ack
    wait_for(lambda: len(read_metrics(fleet.work)) == 2, 300, "round 2 to close", fleet.local)
    after = wait_for(lambda: (s := scrape(fleet.url)).value("edgeblock_rounds_closed_total") == 2 and s, 30,
                     "the scrape to see round 2 closed", fleet.local)
    metrics, store = read_metrics(fleet.work), _store(fleet.work)
    assert len(metrics) == 2 and all(m["updates"] == 3 for m in metrics), [m["closed_because"] for m in metrics]
    assert (after.value("edgeblock_current_round"), after.value("edgeblock_round_open")) == (2, 0)
    assert after.value("edgeblock_updates_accepted_total") == sum(m["updates"] for m in metrics) == \
        sum(len(store.updates(r)) for r in (1, 2))
    assert after.value("edgeblock_tasks_failed_total") == sum(m["failed"] for m in metrics) == 0
    answers = [row for m in metrics for row in m["devices"].values() if row["status"] == "accepted"]
    assert after.value("edgeblock_uploaded_bytes_total") == sum(r["uploaded_bytes"] for r in answers) > 0
    assert after.value("edgeblock_downloaded_bytes_total") == sum(r["downloaded_bytes"] for r in answers) > 0
    seconds = [m["closed_at"] - m["opened_at"] for m in metrics]
    assert after.value("edgeblock_round_duration_seconds_count") == 2
    assert after.value("edgeblock_round_duration_seconds_sum") == pytest.approx(sum(seconds), rel=1e-12)
    assert after.by("edgeblock_round_duration_seconds_bucket", "le") == \
        {**{repr(b): sum(s <= b for s in seconds) for b in DURATION_BUCKETS}, "+Inf": 2}
    assert after.value("edgeblock_last_round_duration_seconds") == pytest.approx(seconds[-1], rel=1e-12)
    assert after.value("edgeblock_last_round_test_accuracy_ratio") == metrics[-1]["accuracy"]
    last = list(metrics[-1]["devices"].values())
    for metric, field in (("edgeblock_last_round_job_peak_bytes", "peak_rss_bytes"),
                          ("edgeblock_last_round_agent_peak_bytes", "agent_peak_rss_bytes")):
        assert after.by(metric, "tier") == {t: max(r.get(field, 0) for r in last if r["tier"] == t)
                                            for t in {r["tier"] for r in last}}
    assert after.value("edgeblock_last_round_job_peak_bytes", tier="pi-zero-2w") > 20 << 20   # a real job's peak
    online, registered = _tiers(store)
    assert after.by("edgeblock_devices_online", "tier") == online == {"a-rogue": 0, "pi-zero-2w": 2}
    assert after.by("edgeblock_devices_registered", "tier") == registered
    assert after.by("edgeblock_rejections_total", "kind") == {k: store.rejection_totals().get(k, 0)
                                                              for k in REJECTION_KINDS}
    assert scrape(fleet.url).samples == after.samples        # an idle coordinator: the numbers hold still


def test_an_in_process_coordinator_names_its_endpoint_refuses_a_taken_port_and_closes_it_on_stop(fleet, tmp_path):
    from coordinator.config import load_config
    from coordinator.service import DEFAULTS, Coordinator
    s = load_config(DEFAULTS, None, settings(tmp_path / "c", fleet.root / "profile.json", "fedavg", min_devices=9,
                                             fleet="metrics-alone"))
    assert s["service"]["metrics_listen"] == ""                  # off unless asked for
    c = Coordinator(s, fleet.broker.host, fleet.broker.port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        s["service"]["metrics_listen"] = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ConfigError, match="cannot listen there"):
            c.run(threading.Event())
    s["service"]["metrics_listen"] = "127.0.0.1:0"
    stop = threading.Event()
    runner = threading.Thread(target=c.run, args=(stop,))
    runner.start()
    try:
        server = wait_for(lambda: getattr(c, "metrics_server", None), 60, "the endpoint to start")
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        alone = scrape(f"http://127.0.0.1:{port}/metrics")
        assert (alone.value("edgeblock_coordinator_leader"), alone.value("edgeblock_rounds_closed_total"),
                alone.value("edgeblock_current_round"), alone.value("edgeblock_round_open")) == (1, 0, 0, 0)
        assert alone.by("edgeblock_devices_registered", "tier") == {}
    finally:
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
