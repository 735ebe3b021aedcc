"""Every decoder, fuzzed: whatever arrives, it returns a valid value or raises its one documented rejection.

A message, a chunk header, a weight file, a manifest, a profile or a settings file may come from a
broken or hostile peer, or from a disk that lost power. The contract of each decoder is the same: a
value that re-encodes (or round-trips), or exactly its clean rejection (ProtocolError on the wire,
IntegrityError for weights and blobs, ManifestError, ProfileError, ConfigError, TierError). The
agent and the coordinator log a rejection as a malformed message; any other exception is a decoder's
bug. The generated inputs are mutations of valid documents plus arbitrary bytes and JSON of every
shape; the `@example`s are the smallest inputs found to break a decoder (they fail until it is fixed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fuzz_helpers import FUZZ, JSON_VALUES, TOML_VALUES, RawToml, accepted_or, json_bytes, mutated, toml_document
from hypothesis import example, given, settings
from hypothesis import strategies as st

from coordinator.config import ConfigError as CoordinatorConfigError
from coordinator.config import load_config
from coordinator.service import DEFAULTS as COORDINATOR_DEFAULTS
from edge_runtime.device.settings import DEFAULTS as DEVICE_DEFAULTS
from edge_runtime.device.settings import ConfigError as DeviceConfigError
from edge_runtime.device.settings import load_settings
from edge_runtime.device.tiers import Tier, TierError, load_tier
from edge_runtime.errors import EdgeRuntimeError, IntegrityError, ManifestError
from edge_runtime.profiling.profile_file import Profile, ProfileError, StagePlan, TierPlan
from edge_runtime.wire import weights
from edge_runtime.wire.manifest import BlockSpec, GraphRef, HeadSpec, LayerSpec, Manifest, ParamSpec
from edge_runtime.wire.mqtt_link import Received
from edge_runtime.wire.part import TrainablePart
from edge_runtime.wire.protocol import (
    MAX_CONTROL_BYTES,
    MAX_DEPTH,
    MAX_FLOAT,
    MAX_INT,
    MAX_TEXT,
    MESSAGES,
    Ack,
    ProtocolError,
    Status,
    Task,
    Topics,
    check_id,
    check_sha,
    decode_any,
)
from edge_runtime.wire.train_config import TrainConfig
from edge_runtime.wire.transfer import BlobStore, ChunkHeader, chunks_of

ALL_MESSAGES = tuple(MESSAGES.values())
SHAS = st.binary(min_size=32, max_size=32).map(bytes.hex)
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
IDS = st.from_regex(rf"\A{ID_PATTERN}\Z")
INDICES = st.integers(-2 ** 63, 2 ** 63)
INDEX_SETS = st.frozensets(INDICES, max_size=6).map(lambda s: tuple(sorted(s)))   # the canonical form from_dict makes

# -- valid values, from the dataclasses' fields and their LIMITS -----------------------------

PARTS = st.builds(TrainablePart, span=st.lists(INDICES, max_size=6).map(tuple), trainable_layers=INDEX_SETS,
                  head=INDICES, train_head=st.booleans(), skip=INDEX_SETS)
POSITIVE = st.floats(min_value=1e-300, max_value=1e300)
CONFIGS = st.builds(
    TrainConfig, optimizer=st.sampled_from(["adamw", "sgd"]), learning_rate=POSITIVE,
    weight_decay=st.floats(0, 1e300), momentum=st.floats(0, 1e300), nesterov=st.booleans(), adam_eps=POSITIVE,
    batch_size=st.integers(1, 2 ** 62), micro_batch_size=st.none() | st.integers(0, 2 ** 62), epochs=POSITIVE,
    max_steps=st.none() | INDICES, seed=INDICES, checkpoint_every_steps=INDICES,
    checkpoint=st.sampled_from(["full", "weights"]), cache_fp16=st.booleans(), threads=INDICES,
    holdout=st.floats(0, 0.9),
).filter(lambda c: not (c.nesterov and c.momentum <= 0))
BLOB_SIZES = st.integers(0, 2 ** 40)
SPECIAL = {   # fields whose validate() asks more than their type and LIMITS
    "device_id": IDS, "task_id": IDS, "tier": IDS, "sha256": SHAS, "blob_sha256": SHAS,
    ("status", "state"): st.sampled_from(["online", "offline"]),
    ("task", "kind"): st.sampled_from(["train", "score"]),
    ("task", "deadline_s"): st.floats(min_value=5e-324, max_value=MAX_FLOAT),
    ("task", "manifest"): st.fixed_dictionaries({"sha256": SHAS}, optional={"size": BLOB_SIZES}),
    ("task", "blobs"): st.lists(st.fixed_dictionaries({"sha256": SHAS, "size": BLOB_SIZES,
                                                       "name": st.text(max_size=200)}), max_size=4),
    ("task", "part"): PARTS, ("task", "config"): CONFIGS,
    ("fetch", "chunks"): st.none() | st.lists(st.integers(0, 10 ** 7 - 1), max_size=20),
    ("resend", "chunks"): st.none() | st.lists(st.integers(0, 10 ** 7 - 1), max_size=20),
    ("update", "holdout_accuracy_before"): st.none() | st.floats(0, 1),
    ("update", "holdout_accuracy"): st.none() | st.floats(0, 1),
    ("scores", "scores"): st.dictionaries(st.just("head") | st.integers(0, 99_999).map(str),
                                          st.floats(0, MAX_FLOAT) | st.integers(0, 10 ** 15), max_size=20),
}


def _field_values(cls, name: str) -> st.SearchStrategy:
    special = SPECIAL.get((cls.TYPE, name), SPECIAL.get(name))
    if special is not None:
        return special
    kind = cls.TYPES[name]
    lo, hi = cls.LIMITS.get(name, (None, None))
    if kind is int:
        return st.integers(0 if lo is None else lo, MAX_INT if hi is None else hi)
    if kind is float:
        return st.floats(-MAX_FLOAT, MAX_FLOAT)
    if kind is str:
        return st.text(max_size=MAX_TEXT if hi is None else hi)
    if kind is bool:
        return st.booleans()
    raise AssertionError(f"no strategy for {cls.__name__}.{name}")


def _messages(cls) -> st.SearchStrategy:
    return st.builds(cls, **{f.name: _field_values(cls, f.name) for f in fields(cls)})


VALID_MESSAGES = st.one_of([_messages(cls) for cls in ALL_MESSAGES])
FIELD_NAMES = sorted({f.name for cls in ALL_MESSAGES for f in fields(cls)} | {"type"}
                     | {f.name for f in fields(TrainConfig)} | {"span", "trainable_layers", "head", "size", "name"})


@st.composite
def mutated_payloads(draw):
    """A valid message's JSON with some of its fields, or of their nested values, edited."""
    raw = json.loads(draw(VALID_MESSAGES).encode())
    return json_bytes(draw(mutated(raw, keys=FIELD_NAMES)))


def _check_message(msg) -> None:
    """An accepted message re-encodes (encode validates too) to the same message."""
    assert type(msg) in ALL_MESSAGES
    payload = msg.encode()
    assert type(msg).decode(payload) == msg
    assert decode_any(payload, ALL_MESSAGES) == msg


def _decode_every_way(payload: bytes) -> None:
    """Each message class and decode_any: a message that re-encodes, or ProtocolError."""
    for cls in ALL_MESSAGES:
        msg = accepted_or(ProtocolError, cls.decode, payload)
        if msg is not None:
            assert isinstance(msg, cls)
            _check_message(msg)
    msg = accepted_or(ProtocolError, decode_any, payload, ALL_MESSAGES)
    if msg is not None:
        _check_message(msg)


# -- protocol messages ----------------------------------------------------------------------

@FUZZ
@given(VALID_MESSAGES)
def test_valid_messages_round_trip(msg):
    _check_message(msg)


@settings(FUZZ, max_examples=150)
@given(st.data())
def test_mutated_messages_decode_or_are_protocol_errors(data):
    _decode_every_way(data.draw(mutated_payloads(), label="payload"))


BIG = "1" + "0" * 400    # an integer JSON parses, too large for a float


@FUZZ
@given(st.binary(max_size=300) | JSON_VALUES.map(json_bytes))
@example(b'{"type":"status","state":"online","at":' + BIG.encode() + b'}')
@example(b'{"type":"update","task_id":"t","round":0,"device_id":"d","blob_sha256":"' + b"0" * 64
         + b'","blob_size":0,"num_examples":1,"loss":' + BIG.encode()
         + b',"steps":0,"peak_rss_bytes":1,"seconds":0}')
@example(b'{"type":"scores","task_id":"t","round":0,"device_id":"d","scores":{"0":' + BIG.encode()
         + b'},"num_examples":1,"peak_rss_bytes":1,"seconds":0}')
@example(b'{"type":"task","task_id":"t","round":0,"manifest":{"sha256":"' + b"0" * 64
         + b'"},"blobs":[],"part":{"span":[0],"trainable_layers":[0],"head":0},"config":{"epochs":'
         + BIG.encode() + b'},"deadline_s":1}')
def test_arbitrary_payloads_decode_or_are_protocol_errors(payload):
    _decode_every_way(payload)


def _nest(value, depth: int):
    for _ in range(depth):
        value = [value]
    return value


HELLO = {"type": "hello", "device_id": "pi-01", "tier": "pi", "budget_bytes": 1 << 20, "runtime_version": "1",
         "cores": 4, "disk_free_bytes": 0}


@pytest.mark.parametrize("payload, accepted", [
    pytest.param(json_bytes({**HELLO, "runtime_version": "[" * 60 + "{" * 4}), True, id="brackets-in-a-string"),
    pytest.param(json_bytes({**HELLO, "runtime_version": '\\"[[[[[[[[[[' + "]" * 9}), True,
                 id="after-an-escaped-quote"),
    pytest.param(json_bytes({**HELLO, "tier": _nest("pi", MAX_DEPTH - 1)}), False, id="at-the-depth-limit"),
    pytest.param(json_bytes({**HELLO, "tier": _nest("pi", MAX_DEPTH)}), False, id="past-the-depth-limit"),
    pytest.param(b"[" * 100_000, False, id="100000-brackets"),
    pytest.param(b"]" * 50 + b"[" * 50, False, id="closing-first"),
    pytest.param(b"{" * 30_000 + b"}" * 30_000, False, id="30000-braces"),
    pytest.param(json_bytes({**HELLO, "budget_bytes": int("9" * 4299)}), False, id="4299-digits"),
    pytest.param(json_bytes(HELLO)[:-1] + b',"cores":' + b"9" * 5000 + b"}", False, id="past-pythons-digit-limit"),
    pytest.param(json_bytes({**HELLO, "runtime_version": "x" * MAX_CONTROL_BYTES}), False, id="oversize"),
    pytest.param(json_bytes(HELLO).replace(b"pi-01", b"pi-\xff"), False, id="not-utf8"),
    pytest.param(json_bytes({**HELLO, "budget_bytes": float("nan")}), False, id="nan-int"),
    pytest.param(b'{"type":"status","state":"online","at":NaN}', False, id="nan-float"),
    pytest.param(b'{"type":"status","state":"online","at":Infinity}', False, id="infinity"),
    pytest.param(b'{"type":"status","state":"online","at":1e400}', False, id="1e400"),
    pytest.param(b'{"type":"status","state":"online","at":-1e16}', False, id="past-max-float"),
    pytest.param(b'{"type":"status","state":"online","at":-1e15}', True, id="at-max-float"),
    pytest.param(b'{"type":"ack","task_id":"t","accepted":1,"reason":""}', False, id="int-for-bool"),
    pytest.param(b'{"type":"ack","task_id":"t","accepted":true,"reason":"","type":"ack"}', True,
                 id="repeated-key"),   # JSON: the last one wins
    pytest.param(b'{"type":"ack","task_id":"t","accepted":true,"reason":"","extra":null}', False, id="unknown-field"),
    pytest.param(json_bytes({**HELLO, "device_id": "pi-01\n"}), False, id="device-id-ending-in-newline"),
    pytest.param(json_bytes({**HELLO, "tier": "pi\n"}), False, id="tier-ending-in-newline"),
])
def test_hostile_payloads_at_the_limits(payload, accepted):
    got = accepted_or(ProtocolError, decode_any, payload, ALL_MESSAGES)
    assert (got is not None) == accepted
    _decode_every_way(payload)


@settings(FUZZ, max_examples=60)
@given(st.data(), st.integers(0, 3 * MAX_DEPTH))
def test_nesting_deeper_than_the_limit_is_refused_before_parsing(data, depth):
    msg = data.draw(VALID_MESSAGES)
    raw = json.loads(msg.encode())
    name = data.draw(st.sampled_from(sorted(set(raw) - {"type"})))
    raw[name] = _nest(raw[name], depth)
    payload = json_bytes(raw)
    got = accepted_or(ProtocolError, type(msg).decode, payload)
    if _json_depth(raw) > MAX_DEPTH:
        assert got is None
    _decode_every_way(payload)


def _json_depth(value) -> int:
    """How deeply JSON arrays and objects nest in a value (0 for a scalar)."""
    if isinstance(value, dict):
        return 1 + max((_json_depth(x) for x in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_json_depth(x) for x in value), default=0)
    return 0


# -- topics ----------------------------------------------------------------------------

TOPICS = Topics("lab")
SEGMENTS = st.sampled_from(["edgeblock", "v1", "lab", "device", "pi-01", "hello", "task", "ack", "", "+", "#",
                            "..", "coordinator", "status", "pi 01", "-pi", "x" * 65, "é"]) | st.text(max_size=10)


@FUZZ
@given(st.lists(SEGMENTS, max_size=8).map("/".join)
       | st.tuples(SEGMENTS, SEGMENTS).map(lambda p: f"{TOPICS.root}/device/{p[0]}/{p[1]}")
       | st.tuples(IDS, st.sampled_from(["hello", "status", "task", "fetch", "blob", "upload", "update", "ack"]))
       .map(lambda p: TOPICS.device(*p)))
@example(TOPICS.device("pi-01", "hello").replace("pi-01", "pi-01\n"))
def test_device_topics_parse_or_are_protocol_errors(topic):
    got = accepted_or(ProtocolError, TOPICS.parse_device_topic, topic)
    if got is not None:
        assert TOPICS.device(*got) == topic and re.fullmatch(ID_PATTERN, got[0])


@FUZZ
@given(IDS | SHAS | st.text(max_size=70) | st.tuples(IDS | SHAS, st.sampled_from(["\n", "\r", " ", "\x00"]))
       .map("".join))
@example("0" * 64 + "\n")
@example("pi-01\n")
def test_ids_and_hashes_are_checked_to_their_last_character(text):
    assert (accepted_or(ProtocolError, check_id, text, "id") is not None) == bool(re.fullmatch(ID_PATTERN, text))
    assert (accepted_or(ProtocolError, check_sha, text, "sha") is not None) == bool(re.fullmatch("[0-9a-f]{64}", text))


# -- chunk headers and the blob store ----------------------------------------------------------

NUMBER_TEXT = (st.integers(0, 10 ** 14).map(str)
               | st.sampled_from(["", "-1", "+1", " 1", "1 ", "1.0", "1e3", "0x10", "²", "¹²", "١", "𝟘", "٣٤",
                                  "0" * 14, "9" * 13, "١" * 13])
               | st.text(alphabet="0123456789²³¹١٢𝟘", max_size=14))
PROPERTY_VALUES = NUMBER_TEXT | SHAS | st.text(max_size=70) | st.none() | st.integers() | st.binary(max_size=4)
HEADER_KEYS = ["blob", "index", "count", "offset", "size", "chunk_sha256"]


@st.composite
def header_properties(draw):
    """A valid chunk's user properties with some values replaced, dropped, duplicated or added."""
    sha = draw(SHAS)
    count = draw(st.integers(1, 10 ** 6))
    index = draw(st.integers(0, count - 1))
    size = draw(st.integers(0, 10 ** 12))
    h = ChunkHeader(sha, index, count, draw(st.integers(0, size)), size, draw(SHAS))
    pairs = list(h.to_properties())
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        i = draw(st.integers(0, max(0, len(pairs) - 1)))
        if action == "replace" and pairs:
            pairs[i] = (pairs[i][0], draw(PROPERTY_VALUES))
        elif action == "drop" and pairs:
            pairs.pop(i)
        else:
            pairs.insert(i, (draw(st.sampled_from(HEADER_KEYS) | st.text(max_size=8)), draw(PROPERTY_VALUES)))
    return pairs


@settings(FUZZ, max_examples=120)
@given(header_properties()
       | st.none() | st.integers() | st.text(max_size=6) | st.lists(st.tuples(PROPERTY_VALUES), max_size=3)
       | st.lists(st.tuples(PROPERTY_VALUES, PROPERTY_VALUES, PROPERTY_VALUES), max_size=3)
       | st.dictionaries(st.sampled_from(HEADER_KEYS), PROPERTY_VALUES)
       | st.lists(st.lists(st.lists(st.integers(), max_size=1), min_size=2, max_size=2), max_size=2))
@example([("blob", "0" * 64), ("index", "²"), ("count", "1"), ("offset", "0"), ("size", "1"),
          ("chunk_sha256", "0" * 64)])
def test_chunk_headers_parse_or_are_protocol_errors(pairs):
    h = accepted_or(ProtocolError, ChunkHeader.from_properties, pairs)
    if h is not None:
        assert 0 <= h.index < h.count and 0 <= h.offset <= h.size
        assert ChunkHeader.from_properties(h.to_properties()) == h


@st.composite
def hostile_chunks(draw, chunks):
    """Real chunks, some with a property or their bytes changed, in any order, with repeats."""
    out = []
    for _ in range(draw(st.integers(1, min(20, 2 * len(chunks) + 2)))):
        h, data = draw(st.sampled_from(chunks))
        props = dict(h.to_properties())
        if draw(st.booleans()):
            key = draw(st.sampled_from(HEADER_KEYS))
            props[key] = draw(NUMBER_TEXT | SHAS | st.sampled_from([props["blob"], props["chunk_sha256"]]))
        if draw(st.booleans()):
            data = draw(st.sampled_from([b"", data[:-1], data + b"\0", bytes(len(data)), data[::-1]])
                        | st.binary(max_size=64))
            if draw(st.booleans()):
                props["chunk_sha256"] = hashlib.sha256(data).hexdigest()   # a consistent lie
        out.append((list(props.items()), data))
    return out


def _inside(root: Path, outer: Path) -> None:
    """Nothing was written under `outer` but inside `root`."""
    for path in outer.rglob("*"):
        assert path.resolve().is_relative_to(root.resolve()), f"{path} was written outside the store"


@settings(FUZZ, max_examples=40)
@given(st.binary(min_size=1, max_size=4000), st.integers(100, 1500), st.data())
def test_blob_store_refuses_hostile_chunks_cleanly_and_stores_only_true_blobs(blob, chunk_bytes, data):
    with tempfile.TemporaryDirectory() as tmp:
        outer = Path(tmp)
        src = BlobStore(outer / "src")
        sha = src.put_bytes(blob)
        chunks = list(chunks_of(src.path(sha), chunk_bytes))
        dst = BlobStore(outer / "dst" / "store", max_blob_bytes=1 << 20)
        for pairs, payload in data.draw(hostile_chunks(chunks)):
            header = accepted_or(ProtocolError, ChunkHeader.from_properties, pairs)
            if header is None:
                continue
            try:
                assert dst.receive(header, payload) in (True, False)
            except (ProtocolError, IntegrityError):
                pass
            if dst.has(header.blob):
                assert hashlib.sha256(dst.path(header.blob).read_bytes()).hexdigest() == header.blob
        _inside(dst.root, outer / "dst")


@settings(FUZZ, max_examples=25)
@given(st.binary(min_size=1, max_size=4000), st.integers(64, 1500), st.randoms(use_true_random=False))
def test_true_chunks_in_any_order_assemble_the_blob(blob, chunk_bytes, rng):
    with tempfile.TemporaryDirectory() as tmp:
        src = BlobStore(Path(tmp) / "src")
        sha = src.put_bytes(blob)
        chunks = list(chunks_of(src.path(sha), chunk_bytes))
        rng.shuffle(chunks)
        dst = BlobStore(Path(tmp) / "dst")
        done = [dst.receive(ChunkHeader.from_properties(h.to_properties()), d) for h, d in chunks]
        assert done[-1] and not any(done[:-1]) and dst.path(sha).read_bytes() == blob


@FUZZ
@given(st.sampled_from(["..", "../x", "/etc/passwd", "partial/../../x", "A" * 64, "g" * 64, "0" * 63, "0" * 65,
                        "0" * 64 + "/..", "0" * 64 + "\n"]) | st.text(max_size=70))
@example("0" * 64 + "\n")
def test_a_header_naming_no_hash_writes_nothing_anywhere(name):
    if re.fullmatch("[0-9a-f]{64}", name):
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = BlobStore(Path(tmp) / "store")
        data = b"payload"
        header = ChunkHeader(name, 0, 1, 0, len(data), hashlib.sha256(data).hexdigest())
        with pytest.raises(ProtocolError):
            store.receive(header, data)
        _inside(store.root, Path(tmp))
        assert not list(store.partial.iterdir())


# -- weights (safetensors) ------------------------------------------------------------------

VALID_WEIGHTS = weights.encode({"layer0.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
                                "layer0.bias": np.ones(2, np.float32), "head.scale": np.full(1, 2.5, np.float32)})


def _split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes, pad: int = 0) -> bytes:
    head = json.dumps(header).encode() + b" " * pad
    return len(head).to_bytes(8, "little") + head + body


@st.composite
def mutated_safetensors(draw):
    """A valid safetensors payload with its header JSON edited, its length prefix or bytes changed, or cut."""
    header, body = _split(VALID_WEIGHTS)
    kind = draw(st.sampled_from(["header", "header", "dtype", "length", "bytes", "cut"]))
    if kind == "header":
        return _join(draw(mutated(header, keys=["dtype", "shape", "data_offsets", "__metadata__"])), body,
                     draw(st.integers(0, 8)))
    if kind == "dtype":
        name = draw(st.sampled_from(sorted(header)))
        header[name]["dtype"] = draw(st.sampled_from(["F64", "F16", "BF16", "I64", "I8", "U8", "BOOL", "F8_E4M3",
                                                      "f32", "", "C64"]))
        return _join(header, body)
    data = bytearray(VALID_WEIGHTS)
    if kind == "length":
        data[:8] = draw(st.integers(0, 2 ** 64 - 1)).to_bytes(8, "little")
    elif kind == "bytes":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    else:
        data = data[:draw(st.integers(0, len(data)))]
    return bytes(data)


def _tensor_header(**entry) -> bytes:
    return _join({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], **entry}}, b"\0" * 4)


WEIGHT_BREAKERS = [
    _join([], b""),                                                    # a header that is not an object
    _join("x", b""),
    _tensor_header(shape=[float("inf")]),                              # JSON's Infinity as a dimension
    _tensor_header(data_offsets=[0, float("inf")]),
    _tensor_header(shape=[10 ** 30]),                                  # a dimension numpy cannot hold
    _tensor_header(shape=[-1, -1]),                                    # accepted, then unreadable
    _tensor_header(shape=[2 ** 62, 4], data_offsets=[0, 0]),           # its byte count wraps to 0 in int64
    (1000).to_bytes(8, "little") + b"[" * 1000,                        # deeper than json's recursion
]


@settings(FUZZ, max_examples=120)
@given(mutated_safetensors() | st.binary(max_size=200))
@example(VALID_WEIGHTS)
def test_weight_payloads_decode_or_are_integrity_errors(data):
    got = accepted_or(IntegrityError, weights.decode, data)
    if got is not None:
        assert all(isinstance(k, str) and v.dtype == np.float32 for k, v in got.items())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _weight_file(path: Path):
    """WeightFile(path), or None on IntegrityError; what it accepts, it must read (or refuse cleanly)."""
    f = accepted_or(IntegrityError, weights.WeightFile, path)
    if f is not None:
        for name in f:
            arr = accepted_or(IntegrityError, f.__getitem__, name)
            assert arr is None or arr.shape == f._entries[name][1] and arr.dtype in (np.float32, np.int64)
    return f


@settings(FUZZ, max_examples=120)
@given(mutated_safetensors() | st.binary(max_size=200))
@example(VALID_WEIGHTS)
def test_weight_files_open_or_are_integrity_errors(scratch, data):
    path = scratch / "w.safetensors"
    path.write_bytes(data)
    _weight_file(path)


@pytest.mark.parametrize("data", WEIGHT_BREAKERS, ids=range(len(WEIGHT_BREAKERS)))
def test_weight_files_that_broke_a_decoder(tmp_path, data):
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    accepted_or(IntegrityError, weights.decode, data)
    _weight_file(path)


def test_valid_weights_are_accepted(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(VALID_WEIGHTS)
    f = weights.WeightFile(tmp_path / "w.safetensors")
    assert f["layer0.weight"].tolist() == [[0, 1, 2], [3, 4, 5]] and f["head.scale"].tolist() == [2.5]
    assert weights.decode(VALID_WEIGHTS)["layer0.bias"].tolist() == [1, 1]


# -- the block manifest, a part, training settings ----------------------------------------------

def _graph(name: str) -> GraphRef:
    return GraphRef(f"graphs/{name}.onnx", hashlib.sha256(name.encode()).hexdigest())


VALID_MANIFEST = json.loads(Manifest(
    model="tiny", input_shape=(1, 4, 4), num_classes=3, opset=17,
    layers=(LayerSpec(0, "stem", 0, _graph("l0"), (1, 4, 4), (2, 4, 4), (ParamSpec("stem.w", (2, 1, 3, 3)),),
                      512, ("Conv", "Relu")),
            LayerSpec(1, "res", 0, _graph("l1"), (2, 4, 4), (2, 4, 4),
                      (ParamSpec("res.w", (2, 2, 3, 3)), ParamSpec("res.mean", (2,), kind="stat")), 256,
                      ("Conv", "BatchNormalization", "Add"), skippable=True),
            LayerSpec(2, "flat", 1, _graph("l2"), (2, 4, 4), (32,), (), 128, ("Flatten",))),
    heads=(HeadSpec(0, "head0", 1, _graph("h0"), (ParamSpec("head0.w", (3, 32), "float16"),), 12, ("Gemm",)),
           HeadSpec(1, "head1", 2, _graph("h1"), (ParamSpec("head1.w", (3, 32)),), 12, ("Gemm",))),
    blocks=(BlockSpec(0, (0, 1), 0), BlockSpec(1, (2,), 1)), weights=_graph("weights")).to_json())
MANIFEST_KEYS = ["format", "model", "layers", "heads", "blocks", "index", "name", "block", "graph", "file", "sha256",
                 "input_shape", "output_shape", "params", "shape", "dtype", "kind", "ops", "skippable", "head",
                 "attach_after_layer", "activation_bytes_per_sample", "weights"]


def test_the_valid_manifest_is_accepted():
    m = Manifest.from_dict(VALID_MANIFEST)
    assert [b.layers for b in m.blocks] == [(0, 1), (2,)] and m.final_head.index == 1


@settings(FUZZ, max_examples=150)
@given(mutated(VALID_MANIFEST, keys=MANIFEST_KEYS, max_mutations=2) | JSON_VALUES)
@example([])
@example({**VALID_MANIFEST, "num_classes": float("inf")})
def test_mutated_manifests_parse_or_are_manifest_errors(raw):
    m = accepted_or(ManifestError, Manifest.from_dict, raw)
    if m is not None:
        assert Manifest.from_dict(json.loads(m.to_json())).to_json() == m.to_json()


@settings(FUZZ, max_examples=40)
@given(st.binary(max_size=100) | mutated(VALID_MANIFEST, keys=MANIFEST_KEYS).map(json_bytes))
@example(b"[" * 1000)
def test_manifest_files_load_or_are_manifest_errors(scratch, data):
    (scratch / "manifest.json").write_bytes(data)
    accepted_or(ManifestError, Manifest.load, scratch / "manifest.json")


PART = {"span": [1, 2], "trainable_layers": [2], "head": 1, "train_head": False, "skip": [1]}


@FUZZ
@given(PARTS)
def test_valid_parts_round_trip(part):
    assert TrainablePart.from_dict(part.to_dict()) == part


@settings(FUZZ, max_examples=100)
@given(mutated(PART, keys=list(PART)) | JSON_VALUES)
def test_mutated_parts_parse_or_are_manifest_errors(raw):
    part = accepted_or(ManifestError, TrainablePart.from_dict, raw)
    if part is not None:
        assert TrainablePart.from_dict(json.loads(json.dumps(part.to_dict()))) == part


@FUZZ
@given(CONFIGS)
def test_valid_training_settings_round_trip(cfg):
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@settings(FUZZ, max_examples=100)
@given(mutated(TrainConfig(optimizer="sgd", momentum=0.9, nesterov=True, micro_batch_size=16, max_steps=100)
               .to_dict(), keys=[f.name for f in fields(TrainConfig)]) | JSON_VALUES)
@example({"learning_rate": 10 ** 400})
def test_mutated_training_settings_parse_or_are_errors(raw):
    cfg = accepted_or(EdgeRuntimeError, TrainConfig.from_dict, raw)
    if cfg is not None:
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# -- the profile file --------------------------------------------------------------------

VALID_PROFILE = json.loads(json.dumps(asdict(Profile(
    model="tiny", manifest_sha256="ab" * 32, created="2025-01-01T00:00:00Z", device={"cores": 4, "machine": "aarch64"},
    baseline_bytes=60 << 20, margin=0.1, measurements=[{"batch": 32, "first": 0, "last": 1, "peak_bytes": 90 << 20}],
    fits=[{"batch": 32, "slope": 1.5, "intercept": 4e6}], span_model={"per_layer": [1, 2, 3]},
    tiers=[TierPlan("tight", 64 << 20, 58 << 20, False, reason="below the runtime's own baseline"),
           TierPlan("roomy", 300 << 20, 272 << 20, True, None, 32,
                    (StagePlan(0, 1, 0, 200 << 20, 190 << 20, 0.5), StagePlan(2, 2, 1, 100 << 20)))]))))
PROFILE_KEYS = sorted(set(VALID_PROFILE) | {f.name for f in fields(TierPlan)} | {f.name for f in fields(StagePlan)})


def _profile_text(profile: Profile) -> str:
    return json.dumps(asdict(profile), sort_keys=True)


def test_the_valid_profile_is_accepted(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(VALID_PROFILE))
    p = Profile.load(tmp_path / "p.json")
    assert p.tier("roomy").stages[1] == StagePlan(2, 2, 1, 100 << 20) and not p.tier("tight").feasible


@settings(FUZZ, max_examples=120)
@given(mutated(VALID_PROFILE, keys=PROFILE_KEYS).map(json_bytes) | JSON_VALUES.map(json_bytes)
       | st.binary(max_size=100))
@example(b"[" * 1000)
@example(json_bytes({**VALID_PROFILE, "tiers": [{**VALID_PROFILE["tiers"][1], "stages": [0]}]}))
def test_mutated_profiles_load_or_are_profile_errors(scratch, data):
    path = scratch / "profile.json"
    path.write_bytes(data)
    p = accepted_or(ProfileError, Profile.load, path)
    if p is not None:
        p.save(path)
        assert _profile_text(Profile.load(path)) == _profile_text(p)


# -- settings files: the coordinator's, the device's, a tier ----------------------------------------

def _typed_value(default) -> st.SearchStrategy:
    """A TOML value of a default's type: what a valid settings file holds."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(-2 ** 63, 2 ** 63 - 1)
    if isinstance(default, float):
        return st.floats(allow_nan=False) | st.integers(-2 ** 53, 2 ** 53)
    if isinstance(default, str):
        return st.text(max_size=20)
    return st.lists(st.integers(1, 512), max_size=4)


@st.composite
def settings_documents(draw, defaults: dict):
    """A settings file: known keys with values of their type, some replaced by a hostile value or misnamed."""
    doc: dict = {}
    for table, values in defaults.items():
        for key in draw(st.lists(st.sampled_from(sorted(values)), max_size=4, unique=True)):
            doc.setdefault(table, {})[key] = draw(_typed_value(values[key]))
    for _ in range(draw(st.integers(0, 2))):
        table = draw(st.sampled_from(sorted(defaults)) | st.text(max_size=6))
        key = draw(st.sampled_from(sorted(defaults.get(table, {"x": 0}))) | st.text(max_size=6))
        doc.setdefault(table, {})[key] = draw(TOML_VALUES)
    if draw(st.booleans()):
        doc[draw(st.sampled_from(sorted(defaults)) | st.text(max_size=6))] = draw(TOML_VALUES)
    return doc


DEEP_TOML = ("a = " + "[" * 600 + "]" * 600 + "\n").encode()    # tomllib recurses per level
HUGE_TIER = ('[tier]\nname = "pi"\ndescription = "a board"\nram_mb = ' + BIG + '\nbudget_mb = 1.0\n'
             'storage_gb = 16.0\ncores = 4\ncpu = "4x A53"\nsource = "the vendor"\n').encode()


def _toml_bytes(doc: dict) -> bytes:
    return toml_document(doc).encode("utf-8")


@settings(FUZZ, max_examples=80)
@given(settings_documents(COORDINATOR_DEFAULTS).map(_toml_bytes) | st.binary(max_size=60))
@example(b"\xff")
@example(DEEP_TOML)
def test_coordinator_config_files_load_or_are_config_errors(scratch, data):
    path = scratch / "coordinator.toml"
    path.write_bytes(data)
    got = accepted_or(CoordinatorConfigError, load_config, COORDINATOR_DEFAULTS, path, {})
    assert issubclass(CoordinatorConfigError, SystemExit)
    if got is not None:
        assert set(got) == set(COORDINATOR_DEFAULTS)
        for table, values in got.items():
            assert set(values) == set(COORDINATOR_DEFAULTS[table])
            for key, value in values.items():
                assert isinstance(value, type(COORDINATOR_DEFAULTS[table][key]))


@settings(FUZZ, max_examples=40)
@given(st.dictionaries(st.sampled_from(sorted(COORDINATOR_DEFAULTS)), st.none(), min_size=1).flatmap(
    lambda tables: st.fixed_dictionaries({t: st.fixed_dictionaries({}, optional={
        k: _typed_value(v) for k, v in COORDINATOR_DEFAULTS[t].items()}) for t in tables})))
def test_valid_coordinator_config_files_are_taken_as_written(scratch, doc):
    path = scratch / "valid.toml"
    path.write_bytes(_toml_bytes(doc))
    got = load_config(COORDINATOR_DEFAULTS, path, {})
    for table, values in doc.items():
        for key, value in values.items():
            assert got[table][key] == value and type(got[table][key]) is type(COORDINATOR_DEFAULTS[table][key])


@settings(FUZZ, max_examples=60)
@given(settings_documents({"device": DEVICE_DEFAULTS}).map(_toml_bytes) | st.binary(max_size=60))
@example(DEEP_TOML)
def test_device_settings_files_load_or_are_config_errors(scratch, data):
    path = scratch / "device.toml"
    path.write_bytes(data)
    got = accepted_or(DeviceConfigError, load_settings, path, {})
    if got is not None:
        assert set(got) == set(DEVICE_DEFAULTS)
        for key, value in got.items():
            expected = type(DEVICE_DEFAULTS[key])
            assert isinstance(value, expected) and (expected is bool or not isinstance(value, bool))


VALID_TIER = {"tier": {"name": "pi", "description": "a board", "ram_mb": 512, "budget_mb": 200.0,
                       "storage_gb": 16.0, "cores": 4, "cpu": "4x Cortex-A53", "source": "the vendor's page"}}


def test_the_valid_tier_is_accepted(tmp_path):
    (tmp_path / "pi.toml").write_bytes(_toml_bytes(VALID_TIER))
    assert load_tier(tmp_path / "pi.toml") == Tier(path=tmp_path / "pi.toml", **VALID_TIER["tier"])


@st.composite
def tier_documents(draw):
    doc = {"tier": dict(VALID_TIER["tier"])}
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(VALID_TIER["tier"])) | st.text(max_size=8))
        action = draw(st.sampled_from(["replace", "drop", "table"]))
        if action == "drop":
            doc["tier"].pop(key, None)
        elif action == "table":
            doc[key] = draw(TOML_VALUES)
        else:
            doc["tier"][key] = draw(TOML_VALUES | st.integers(-5, 5000) | st.floats(-5, 5000)
                                    | st.sampled_from([RawToml("nan"), RawToml("inf"), "pi", " ", ""]))
    return _toml_bytes(doc)


@settings(FUZZ, max_examples=80)
@given(tier_documents() | st.binary(max_size=60))
@example(HUGE_TIER)
@example(DEEP_TOML)
def test_tier_files_load_or_are_tier_errors(scratch, data):
    path = scratch / "pi.toml"
    path.write_bytes(data)
    tier = accepted_or(TierError, load_tier, path)
    if tier is not None:
        assert tier.name == "pi" and 0 < tier.budget_mb < tier.ram_mb and tier.cores >= 1 and tier.storage_gb > 0


# -- the agent: nothing received stops it, and a bad message is a ProtocolError, not a decoder's bug ------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@settings(FUZZ, max_examples=60)
@given(st.sampled_from([TOPICS.coordinator_status, TOPICS.device("pi-01", "task"), TOPICS.device("pi-01", "ack"),
                        TOPICS.device("pi-01", "blob"), "elsewhere"]),
       VALID_MESSAGES.map(lambda m: m.encode())
       | mutated_payloads()
       | JSON_VALUES.map(json_bytes) | st.binary(max_size=100))
@example(TOPICS.device("pi-01", "task"), b'{"type":"idle","round":0,"reason":"' + b"[" * 9 + b'"}')
@example(TOPICS.coordinator_status, b'{"type":"status","state":"online","at":' + BIG.encode() + b'}')
def test_the_agent_reads_every_message_as_a_message_or_a_protocol_error(topic, payload):
    from edge_runtime.device.agent import Agent
    kept, statuses = [], []
    agent = SimpleNamespace(cfg=SimpleNamespace(topics=TOPICS), _keep=kept.append,
                            _on_coordinator_status=statuses.append)
    records = _Records()
    logger = logging.getLogger("edge_runtime.device")
    logger.addHandler(records)
    try:
        got = Agent._route(agent, Received(topic, payload, [], 0, 1))
    finally:
        logger.removeHandler(records)
    assert not records.records, f"the agent could not read a message: {records.records[0].exc_info[1]!r}"
    assert got is None or isinstance(got, Ack)
    assert all(isinstance(t, Task) for t in kept) and all(isinstance(s, Status) for s in statuses)
