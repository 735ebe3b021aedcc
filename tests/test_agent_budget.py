"""A device started with only its tier announces that tier's job budget: the agent's share is not taken twice."""
import time

from coordinator.local.fleet import DeviceSpec, LocalFleet
from coordinator.ops.broker import EmbeddedBroker
from edge_runtime.device.tiers import AGENT_RESERVE_MB, find_tier
from edge_runtime.memory import MIB
from edge_runtime.wire.mqtt_link import MqttLink, parse_broker_url
from edge_runtime.wire.protocol import Hello, Topics, decode_any


def test_a_tier_devices_jobs_get_the_tiers_budget(tmp_path, small_dataset):
    tier = find_tier("pi-zero-2w")
    topics = Topics("budget")
    with EmbeddedBroker(tmp_path / "broker") as broker, LocalFleet(tmp_path / "fleet", broker.url, "budget") as fleet:
        host, port = parse_broker_url(broker.url)
        link = MqttLink("watcher", host, port, [(topics.all_devices("hello"), 1)]).start()
        try:
            # no --budget-mb: the budget comes from profiles/pi-zero-2w.toml
            fleet.start_device(DeviceSpec("d1", tier.name, None, small_dataset.root))
            hello, deadline = None, time.monotonic() + 60
            while hello is None and time.monotonic() < deadline:
                msg = link.get(timeout_s=1.0)
                if msg is not None:
                    hello = decode_any(msg.payload, (Hello,))
            assert hello is not None, fleet.log_tail("d1")
        finally:
            link.stop()
    # the tier's budget_mb is the jobs' share (docs/profiles.md); the agent lives in the reserve
    # beside it, so the announced job budget is budget_mb give or take the agent's own size
    assert hello.tier == tier.name
    assert abs(hello.budget_bytes - tier.budget_bytes) <= 12 * MIB, hello.budget_bytes / MIB
    assert hello.budget_bytes > tier.budget_bytes - AGENT_RESERVE_MB * MIB + 24 * MIB
