"""The wire protocol's codec: every message round-trips; every malformed one is refused with its reason."""
import json

import pytest

from edge_runtime.wire.protocol import (
    MAX_CONTROL_BYTES,
    Ack,
    Failed,
    Fetch,
    Hello,
    Idle,
    ProtocolError,
    Scores,
    Status,
    Task,
    Topics,
    Update,
    decode_any,
)

SHA = "ab" * 32
MESSAGES = [
    Hello("pi-01", "pi-zero-2w", 300 << 20, "0.1.0", 4, 10 ** 10),
    Status("online", 1795240000.5),
    Task("r3-pi-01", 3, {"sha256": SHA, "size": 4000}, [{"sha256": SHA, "size": 10, "name": "graphs/x.onnx"}],
         {"span": [1, 2], "trainable_layers": [1, 2], "head": 1}, {"batch_size": 32}, 120.0),
    Fetch(SHA, [0, 3, 7]),
    Fetch(SHA),
    Update("r3-pi-01", 3, "pi-01", SHA, 123456, 600, 0.42, 19, 150 << 20, 12.5),
    Update("r3-pi-01", 3, "pi-01", SHA, 123456, 600, 0.42, 19, 150 << 20, 12.5, 5000, 40 << 20),
    Update("r3-pi-01", 3, "pi-01", SHA, 123456, 480, 0.42, 19, 150 << 20, 12.5, holdout_examples=120,
           holdout_accuracy_before=0.25, holdout_accuracy=0.9),
    Failed("r3-pi-01", 3, "pi-01", "does not fit a budget of 90 MB: needs 102 MB", 102 << 20),
    Ack("r3-pi-01", False, "norm 1e9 exceeds the bound 1e3"),
    Idle(4, "block 0 does not fit 90 MB; layers 0-0 need 99 MB at batch 32 (with margin)"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.TYPE)
def test_messages_round_trip(msg):
    assert type(msg).decode(msg.encode()) == msg


def _hello(**change):
    raw = json.loads(MESSAGES[0].encode())
    raw.update(change)
    return json.dumps(raw).encode()


@pytest.mark.parametrize("payload, reason", [
    (b"\xff\xfe", "not a UTF-8 JSON object"),
    (b"[1, 2]", "must be a JSON object"),
    (_hello(type="update"), "'type' field must be 'hello'"),
    (_hello(extra=1), r"unknown field\(s\) \['extra'\]"),
    (_hello(budget_bytes="300"), "'budget_bytes' must be int"),
    (_hello(budget_bytes=True), "'budget_bytes' must be int, not bool"),
    (_hello(budget_bytes=-1), "must be positive"),
    (_hello(device_id="../etc"), "not a valid id"),
    (_hello(device_id="x" * 65), "not a valid id"),
    (b'{"type":"hello","tier":"a"}', "missing field 'device_id'"),
])
def test_malformed_hello_is_refused_with_its_reason(payload, reason):
    with pytest.raises(ProtocolError, match=reason):
        Hello.decode(payload)


def test_non_finite_numbers_and_oversize_payloads_are_refused():
    raw = json.loads(MESSAGES[5].encode())
    raw["loss"] = float("nan")
    with pytest.raises(ProtocolError, match="must be finite"):
        Update.decode(json.dumps(raw).encode())
    with pytest.raises(ProtocolError, match="exceeds"):
        Update.decode(b" " * (MAX_CONTROL_BYTES + 1))
    raw = json.loads(MESSAGES[5].encode())
    raw["blob_sha256"] = "not-a-hash"
    with pytest.raises(ProtocolError, match="sha256"):
        Update.decode(json.dumps(raw).encode())


def test_task_blob_list_is_checked_entry_by_entry():
    raw = json.loads(MESSAGES[2].encode())
    raw["blobs"].append({"sha256": SHA, "size": -1, "name": "w"})
    with pytest.raises(ProtocolError, match=r"blobs\[1\].size"):
        Task.decode(json.dumps(raw).encode())


def test_topics_are_built_and_parsed_for_one_fleet_only():
    t = Topics("lab")
    assert t.device("pi-01", "update") == "edgeblock/v1/lab/device/pi-01/update"
    assert t.parse_device_topic(t.device("pi-01", "update")) == ("pi-01", "update")
    assert t.all_devices("hello") == "edgeblock/v1/lab/device/+/hello"
    for bad in ("edgeblock/v1/other/device/pi-01/update", "edgeblock/v1/lab/device/pi-01/bogus",
                "edgeblock/v1/lab/device/a/b/update"):
        with pytest.raises(ProtocolError):
            t.parse_device_topic(bad)
    with pytest.raises(ProtocolError):
        Topics("bad/fleet")


def test_the_update_topic_carries_updates_and_failure_reports_and_nothing_else():
    update, failed = MESSAGES[5], MESSAGES[7]
    assert decode_any(update.encode(), (Update, Failed)) == update
    assert decode_any(failed.encode(), (Update, Failed)) == failed
    with pytest.raises(ProtocolError, match="'hello' is not one of"):
        decode_any(MESSAGES[0].encode(), (Update, Failed))
    with pytest.raises(ProtocolError, match="not a UTF-8 JSON object"):
        decode_any(b"{not json", (Update, Failed))
    with pytest.raises(ProtocolError, match="downloaded_bytes"):
        Update.decode(json.dumps(dict(json.loads(update.encode()), downloaded_bytes=-5)).encode())


def test_score_tasks_and_their_scores():
    task = Task("r1-x-pi", 1, {"sha256": SHA, "size": 1}, [], {"span": [0], "trainable_layers": [0], "head": 0}, {}, 10.0, kind="score")
    assert Task.decode(task.encode()).kind == "score"
    with pytest.raises(ProtocolError, match="kind must be train or score"):
        Task.decode(task.encode().replace(b'"score"', b'"mine"'))
    scores = Scores("r1-x-pi", 1, "pi", {"0": 1.5, "3": 0.0, "head": 2}, 600, 90 << 20, 3.2)
    assert decode_any(scores.encode(), (Update, Scores)) == scores
    for bad, reason in ((scores.scores | {"x1": 1.0}, "neither a layer index"), ({"0": -1.0}, ">= 0"),
                        ({"0": True}, ">= 0")):
        with pytest.raises(ProtocolError, match=reason):
            Scores.decode(json.dumps(dict(json.loads(scores.encode()), scores=bad)).encode())


@pytest.mark.parametrize("payload, reason", [
    (b'{"type": "hello", "device_id": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper"),
    (b'{"type": "update", "round": ' + b"9" * 5000 + b"}", "not a UTF-8 JSON object"),
    (json.dumps(dict(json.loads(MESSAGES[5].encode()), num_examples=2 ** 63)).encode(), "num_examples"),
    (json.dumps(dict(json.loads(MESSAGES[5].encode()), loss=1e300)).encode(), "loss"),
    (json.dumps(dict(json.loads(MESSAGES[7].encode()), reason="x" * 5000)).encode(), "reason"),
    (json.dumps(dict(json.loads(MESSAGES[5].encode()), task_id="x" * 100)).encode(), "not a valid id"),
])
def test_deep_huge_and_long_values_are_protocol_errors_before_they_reach_anything(payload, reason):
    """Nesting is refused before parsing; every integer, float, string and list is bounded (what SQLite,
    a log line and arithmetic downstream can take): each is a ProtocolError, never another exception."""
    with pytest.raises(ProtocolError, match=reason):
        decode_any(payload, (Hello, Update, Failed))


def test_untrusted_text_is_one_log_line():
    from edge_runtime.wire.protocol import printable
    forged = "disk full\n2026-12-03 12:00:00 edge-coordinator INFO round 9 closed\r\x1b[2K"
    shown = printable(forged)
    assert "\n" not in shown and "\r" not in shown and "\x1b" not in shown
    assert shown.startswith("disk full\\n2026")
    assert len(printable("y" * 10_000)) < 400


@pytest.mark.parametrize("field,value", [("holdout_accuracy", 1.5), ("holdout_accuracy_before", -0.1),
                                         ("holdout_examples", -1)])
def test_held_out_accuracy_is_a_fraction_and_its_row_count_not_negative(field, value):
    raw = json.loads(Update("r3-pi-01", 3, "pi-01", SHA, 1, 600, 0.42, 19, 150 << 20, 12.5, holdout_examples=120,
                            holdout_accuracy_before=0.25, holdout_accuracy=0.9).encode())
    raw[field] = value
    with pytest.raises(ProtocolError, match=field):
        Update.decode(json.dumps(raw).encode())


def test_a_task_holds_out_at_most_nine_tenths_of_the_rows():
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.wire.train_config import TrainConfig
    assert TrainConfig.from_dict({"holdout": 0.2}).holdout == 0.2
    with pytest.raises(EdgeRuntimeError, match="holdout"):
        TrainConfig.from_dict({"holdout": 0.95})
