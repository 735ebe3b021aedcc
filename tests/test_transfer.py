"""Chunked, content-addressed blobs: assembly in any order, resumption, and refusal of bad chunks."""
import hashlib
import os
import time

import pytest

from edge_runtime.errors import IntegrityError
from edge_runtime.wire.protocol import ProtocolError
from edge_runtime.wire.transfer import BlobStore, ChunkHeader, chunk_bytes_for, chunks_of


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(1_000_003)  # not a multiple of the chunk size
    src = BlobStore(tmp_path / "src")
    return data, src.path(src.put_bytes(data))


def test_out_of_order_and_duplicate_chunks_assemble_the_blob(blob, tmp_path):
    data, path = blob
    chunks = list(chunks_of(path, 64 * 1024))
    assert len(chunks) == 16 and chunks[-1][0].offset + len(chunks[-1][1]) == len(data)
    dst = BlobStore(tmp_path / "dst")
    order = list(reversed(chunks)) + chunks[:3]   # reversed, then three duplicates
    done = [dst.receive(h, d) for h, d in order]
    assert done[15] and all(done[15:]) and not any(done[:15])
    assert dst.path(hashlib.sha256(data).hexdigest()).read_bytes() == data
    assert not list((tmp_path / "dst" / "partial").iterdir())


def test_transfer_resumes_after_a_restart_with_only_the_missing_chunks(blob, tmp_path):
    data, path = blob
    chunks = list(chunks_of(path, 64 * 1024))
    sha = chunks[0][0].blob
    first = BlobStore(tmp_path / "dst")
    assert first.missing_chunks(sha) is None
    for h, d in chunks[::2]:
        first.receive(h, d)
    again = BlobStore(tmp_path / "dst")  # a new process on the same disk
    missing = again.missing_chunks(sha)
    assert missing == list(range(1, 16, 2))
    for h, d in chunks_of(path, 64 * 1024, missing):
        again.receive(h, d)
    assert again.has(sha) and again.missing_chunks(sha) == []
    assert again.path(sha).read_bytes() == data


def test_a_corrupted_chunk_is_refused_and_not_recorded(blob, tmp_path):
    _, path = blob
    h, d = next(chunks_of(path, 64 * 1024))
    dst = BlobStore(tmp_path / "dst")
    with pytest.raises(ProtocolError, match="do not match chunk_sha256"):
        dst.receive(h, bytes([d[0] ^ 1]) + d[1:])
    assert dst.missing_chunks(h.blob) is None or 0 in dst.missing_chunks(h.blob)


def test_chunks_that_lie_about_the_blob_are_refused(blob, tmp_path):
    _, path = blob
    chunks = list(chunks_of(path, 64 * 1024))
    dst = BlobStore(tmp_path / "dst", max_blob_bytes=10_000_000)
    dst.receive(*chunks[0])
    h, d = chunks[1]
    liar = ChunkHeader(h.blob, h.index, h.count + 1, h.offset, h.size, h.chunk_sha256)
    with pytest.raises(ProtocolError, match="earlier chunks said"):
        dst.receive(liar, d)
    huge = ChunkHeader(h.blob, 0, 1, 0, 10_000_001, h.chunk_sha256)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        BlobStore(tmp_path / "other", max_blob_bytes=10_000_000).receive(huge, d)


def test_a_blob_whose_chunks_are_valid_but_whose_name_is_wrong_is_discarded(tmp_path):
    data = os.urandom(5000)
    src = BlobStore(tmp_path / "src")
    path = src.path(src.put_bytes(data))
    h, d = next(chunks_of(path, 8192))
    wrong_name = ChunkHeader("0" * 64, 0, 1, 0, len(d), h.chunk_sha256)
    dst = BlobStore(tmp_path / "dst")
    with pytest.raises(IntegrityError, match="discarded"):
        dst.receive(wrong_name, d)
    assert not dst.has("0" * 64) and not list((tmp_path / "dst" / "partial").iterdir())


def test_header_round_trips_through_user_properties_and_rejects_garbage():
    h = ChunkHeader("a" * 64, 2, 5, 2048, 5000, "b" * 64)
    assert ChunkHeader.from_properties(h.to_properties()) == h
    with pytest.raises(ProtocolError, match="missing user properties"):
        ChunkHeader.from_properties([("blob", "a" * 64)])
    with pytest.raises(ProtocolError, match="inconsistent"):
        ChunkHeader.from_properties(ChunkHeader("a" * 64, 5, 5, 0, 10, "b" * 64).to_properties())
    with pytest.raises(ProtocolError, match="integers"):
        ChunkHeader.from_properties([(k, "x" if k == "index" else v) for k, v in h.to_properties()])


def test_chunk_size_respects_the_brokers_maximum_packet():
    assert chunk_bytes_for(None) == 120 * 1024
    assert chunk_bytes_for(64 * 1024) == 64 * 1024 - 4096
    with pytest.raises(ProtocolError, match="no room"):
        chunk_bytes_for(2000)


def test_replicas_receiving_chunks_of_one_blob_into_a_shared_store_assemble_it_once(blob, tmp_path):
    """Coordinator replicas: the broker hands each chunk of an upload to one of them, all writing one store."""
    import subprocess
    import sys
    data, path = blob
    sha = hashlib.sha256(data).hexdigest()
    chunks = list(chunks_of(path, 16 * 1024))                  # 62 chunks, dealt to two processes in turn
    shared = tmp_path / "incoming"
    BlobStore(shared, shared=True)
    code = """
import sys
from pathlib import Path
from edge_runtime.wire.transfer import BlobStore, chunks_of
store = BlobStore(Path(sys.argv[1]), shared=True)
done = [store.receive(h, d) for i, (h, d) in enumerate(chunks_of(Path(sys.argv[2]), 16 * 1024))
        if i % 2 == int(sys.argv[3])]
print(sum(done))
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, str(shared), str(path), str(k)], stdout=subprocess.PIPE,
                              text=True) for k in (0, 1)]
    completions = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert BlobStore(shared).path(sha).read_bytes() == data
    assert sum(completions) >= 1 and len(chunks) == 62      # the process with the last chunk saw it complete
    assert [p.name for p in (shared / "partial").iterdir()] == ["lock"]   # no partial left behind


def test_a_blob_assembled_here_is_known_hashed_until_its_file_changes(blob, tmp_path):
    """The close of a round hashes again only what it cannot vouch for: a blob this process assembled (and hashed)
    whose file is untouched is; one written some other way, altered since, or after a restart is not."""
    data, path = blob
    dst = BlobStore(tmp_path / "dst")
    for h, d in chunks_of(path, 64 * 1024):
        dst.receive(h, d)
    sha = hashlib.sha256(data).hexdigest()
    assert dst.hashed_unchanged(sha)
    assert not BlobStore(tmp_path / "dst").hashed_unchanged(sha)         # a restarted coordinator hashes it again
    other = dst.put_bytes(b"an update put another way")
    assert not dst.hashed_unchanged(other)
    raw = bytearray(dst.path(sha).read_bytes())
    raw[0] ^= 0xFF
    time.sleep(0.02)      # file times may tick only every few ms: an alteration is a later change, as in life
    dst.path(sha).write_bytes(bytes(raw))                                   # altered on disk
    assert not dst.hashed_unchanged(sha)
    dst.remove_complete()
    assert not dst.hashed_unchanged(sha)


def test_complete_blobs_removed_later_are_gone_from_the_store_at_once(tmp_path):
    """remove_complete(later=...) renames the complete blobs aside at once and leaves the deleting to `later`;
    partial blobs stay, a blob that comes again meanwhile is a new one, and what a stopped process left aside is
    deleted by the next store opened on the directory."""
    from edge_runtime.wire.transfer import REMOVING
    store = BlobStore(tmp_path / "in")
    shas = [store.put_bytes(f"update {i}".encode() * 100) for i in range(5)]
    data = os.urandom(10_000)
    source = tmp_path / hashlib.sha256(data).hexdigest()      # a blob's file is named by its hash
    source.write_bytes(data)
    header, chunk = next(chunks_of(source, 4096))
    store.receive(header, chunk)                              # one chunk of three: partial
    deferred = []
    assert store.remove_complete(later=lambda *call: deferred.append(call)) == 5
    assert not any(store.has(s) for s in shas) and store.missing_chunks(header.blob) == [1, 2]
    (fn, aside, _), = deferred
    assert sorted(p.name for p in aside.iterdir()) == sorted(shas) and aside.name.startswith(REMOVING)
    again = store.put_bytes(b"update 0" * 100)               # the same blob, uploaded again before the deleting
    assert again == shas[0] and store.has(again)
    fn(aside, True)
    assert not aside.exists() and store.has(again)
    store.remove_complete(later=lambda *call: None)          # set aside, never deleted: the process stopped
    assert list(store.root.glob(REMOVING + "*"))
    BlobStore(tmp_path / "in")
    assert not list(store.root.glob(REMOVING + "*")) and store.missing_chunks(header.blob) == [1, 2]
