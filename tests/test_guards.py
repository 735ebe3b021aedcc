"""What one device may cost the coordinator (coordinator/guards.py): each bound, at its edge."""
from __future__ import annotations

import hashlib
import os

import pytest

from coordinator.guards import (
    Admission,
    Fetches,
    GuardSettings,
    RateLimit,
    Refusal,
    UploadGrants,
    Uploads,
    benched_rounds,
    rejection_kind,
)
from edge_runtime.errors import IntegrityError
from edge_runtime.wire.protocol import ProtocolError
from edge_runtime.wire.transfer import BlobStore, ChunkHeader, chunks_of

S = GuardSettings(max_devices=3, hellos_per_minute=2, max_partial_uploads=2, partial_upload_ttl_s=10.0)


def test_a_rate_limit_allows_per_minute_per_key_and_forgets_the_oldest_keys():
    limit = RateLimit(2, max_keys=2)
    assert [limit.allow("a", now=t) for t in (0, 1, 2)] == [True, True, False]
    assert limit.allow("a", now=60.5)                 # the first event left the window
    assert limit.allow("b", now=61) and limit.allow("c", now=61)
    assert list(limit._seen) == ["b", "c"]             # "a", the oldest, was forgotten: memory stays bounded


def test_admission_refuses_unlisted_ids_a_full_registry_and_chatty_ids():
    listed = Admission(S, listed=["d0"])
    assert "not on the fleet's device list" in listed.refuse_hello("intruder", known=False, registered=0)
    open_fleet = Admission(S)
    assert "registry is full" in open_fleet.refuse_hello("d9", known=False, registered=3)
    assert open_fleet.refuse_hello("d0", known=True, registered=3, now=0) is None   # a known device may return
    assert open_fleet.refuse_hello("d0", known=True, registered=3, now=1) is None
    assert "hellos a minute" in open_fleet.refuse_hello("d0", known=True, registered=3, now=2)


def test_a_device_uploads_at_most_its_slots_and_only_what_it_owes():
    uploads = Uploads(S)
    assert "owes no update" in uploads.refuse_chunk("d0", "a" * 64, 100, allowed_bytes=None)
    assert "exceeds" in uploads.refuse_chunk("d0", "a" * 64, 1000, allowed_bytes=999)
    assert uploads.refuse_chunk("d0", "a" * 64, 100, 999, now=0) is None
    assert uploads.refuse_chunk("d0", "b" * 64, 100, 999, now=0) is None
    assert "already uploads 2" in uploads.refuse_chunk("d0", "c" * 64, 100, 999, now=0)
    assert uploads.refuse_chunk("d1", "c" * 64, 100, 999, now=0) is None          # slots are per device
    assert uploads.expired(now=5) == []
    assert uploads.refuse_chunk("d0", "a" * 64, 100, 999, now=5) is None          # a chunk keeps its upload alive
    assert sorted(uploads.expired(now=12)) == ["b" * 64, "c" * 64]
    assert uploads.refuse_chunk("d0", "d" * 64, 100, 999, now=12) is None         # b's slot is free again


def test_complete_blobs_no_update_names_are_bounded_per_device():
    uploads = Uploads(S)
    blobs = [c * 64 for c in "abcd"]
    extras = []
    for blob in blobs:
        assert uploads.refuse_chunk("d0", blob, 100, 999) is None
        extras += uploads.completed(blob)
    assert extras == blobs[:2]                      # the newest max_partial_uploads stay, the rest are deleted
    uploads.claimed(blobs[3])                       # an update named it: it is not the upload's to delete
    assert uploads.refuse_chunk("d0", "e" * 64, 100, 999) is None
    assert uploads.completed("e" * 64) == []        # c and e unclaimed: within the bound
    assert uploads.completed("never-started") == []


def test_a_straggler_sits_out_a_growing_number_of_rounds():
    assert benched_rounds([None, "missed"], after_misses=2, most=8) == 0
    assert [benched_rounds(["missed"] * k, after_misses=2, most=8) for k in (2, 3, 4, 5, 9)] == [1, 2, 4, 8, 8]
    assert benched_rounds(["missed", "missed", None], after_misses=2, most=8) == 0   # one answer clears it


def test_a_blob_store_refuses_more_chunks_than_bytes_and_forgets_a_finished_blob(tmp_path):
    data = os.urandom(5000)
    sha = hashlib.sha256(data).hexdigest()
    piece = data[:1]
    lie = ChunkHeader(sha, 0, 5001, 0, 5000, hashlib.sha256(piece).hexdigest())
    with pytest.raises(ProtocolError, match="inconsistent"):
        ChunkHeader.from_properties(lie.to_properties())
    source = BlobStore(tmp_path / "out")
    source.put_bytes(data)
    store = BlobStore(tmp_path / "in")
    done = [store.receive(h, c) for h, c in chunks_of(source.path(sha), 1000)]
    assert done == [False] * 4 + [True] and store.has(sha) and store._received == {}
    store.remove(sha)
    assert not store.has(sha) and store.remove_complete() == 0


def test_a_task_s_blobs_are_served_a_bounded_number_of_times_over():
    fetches = Fetches(GuardSettings(fetches_per_minute=100, fetch_allowance=2.0))
    named = {"a" * 64: 1000, "b" * 64: 3000}
    assert "no open task of its names" in fetches.refuse("d0", "c" * 64, named, "t1", 10)
    assert fetches.refuse("d0", "b" * 64, named, "t1", 3000) is None
    assert fetches.refuse("d0", "a" * 64, named, "t1", 1000) is None
    assert fetches.refuse("d0", "b" * 64, named, "t1", 3000) is None       # 7000 of 8000 bytes: retries fit
    assert "fetch_allowance" in fetches.refuse("d0", "b" * 64, named, "t1", 3000)
    assert fetches.refuse("d0", "b" * 64, named, "t2", 3000) is None       # the next task starts afresh
    limited = Fetches(GuardSettings(fetches_per_minute=1))
    assert limited.refuse("d0", "a" * 64, named, "t", 1, now=0) is None
    assert "fetches a minute" in limited.refuse("d0", "a" * 64, named, "t", 1, now=1)


def test_a_blob_uploaded_again_is_never_deleted_as_its_own_extra():
    """A device resending the same update uploads the same content-addressed blob: it is one blob, kept."""
    uploads = Uploads(S)
    for _ in range(4):
        assert uploads.refuse_chunk("d0", "a" * 64, 100, 999) is None
        assert uploads.completed("a" * 64) == []
    extras = []
    for blob in ("a" * 64, "b" * 64, "c" * 64):   # d1 uploads the bytes d0 did, then two more
        assert uploads.refuse_chunk("d1", blob, 100, 999) is None
        extras += uploads.completed(blob)
    assert extras == []                           # a is d1's extra, but d0 may still name it: kept
    assert uploads.refuse_chunk("d1", "d" * 64, 100, 999) is None
    assert uploads.completed("d" * 64) == ["b" * 64]   # b is d1's alone


def test_every_refusal_carries_the_kind_it_is_counted_under():
    """The service raises a refusal as ProtocolError(refusal) and counts it under the kind rejection_kind reads."""
    chatty, uploads = Admission(S), Uploads(S)
    assert chatty.refuse_hello("d0", True, 3, now=0) is None and chatty.refuse_hello("d0", True, 3, now=1) is None
    for blob in ("a" * 64, "b" * 64):
        assert uploads.refuse_chunk("d0", blob, 100, 999) is None
    named = {"a" * 64: 10}
    rate, allowance = Fetches(GuardSettings(fetches_per_minute=1)), Fetches(GuardSettings(fetch_allowance=1.0))
    assert rate.refuse("d0", "a" * 64, named, "t", 1, now=0) is None
    refusals = {
        "not_admitted": [Admission(S, listed=["d0"]).refuse_hello("intruder", False, 0),
                         Admission(S).refuse_hello("d9", False, 3)],
        "over_limit": [chatty.refuse_hello("d0", True, 3, now=2), uploads.refuse_chunk("d0", "c" * 64, 100, 999),
                       rate.refuse("d0", "a" * 64, named, "t", 1, now=1),
                       allowance.refuse("d0", "a" * 64, named, "t", 20)],
        "unsolicited": [uploads.refuse_chunk("d1", "c" * 64, 100, None), allowance.refuse("d0", "c" * 64, named, "t")],
        "oversize": [uploads.refuse_chunk("d1", "c" * 64, 1000, 999)],
    }
    for kind, found in refusals.items():
        for refusal in found:
            assert isinstance(refusal, Refusal) and refusal.kind == kind, (kind, refusal)
            assert rejection_kind(ProtocolError(refusal)) == kind and str(ProtocolError(refusal)) == refusal
    assert rejection_kind(ProtocolError("hello: JSON nested deeper than 8 levels")) == "malformed"
    assert rejection_kind(IntegrityError("blob 0123 assembled to sha256 4567; discarded, fetch it again")) == \
        "integrity"
    with pytest.raises(ValueError, match="unknown rejection kind 'rude'"):
        Refusal("rude", "a kind no count has")


def test_uploads_are_granted_a_few_at_a_time_in_order_and_a_silent_grant_expires():
    g = UploadGrants(slots=2, ttl_s=30.0)
    for i in range(4):
        assert g.ask(f"t{i}", f"b{i}", now=0.0) is False
    assert g.ask("t1", "b1", now=1.0) is False           # asked again while it waits: still one place in line
    assert g.grant(now=1.0) == ["t0", "t1"] and g.counts() == (2, 2)
    assert g.grant(now=2.0) == []                         # no slot is free
    assert g.ask("t0", "b0", now=3.0) is True             # granted and asking again: its chunks were lost
    g.release("t0")                                       # judged: the next one goes
    assert g.grant(now=4.0) == ["t2"]
    g.progress("b2", now=33.0)                            # t2's chunks keep coming; t1 sent nothing since 1.0
    assert g.grant(now=33.0) == ["t3"] and g.counts() == (2, 0)
    assert g.ask("t1", "b1", now=34.0) is False           # its grant expired: it queues again
    g.clear()
    assert g.counts() == (0, 0) and g.grant(now=35.0) == []
