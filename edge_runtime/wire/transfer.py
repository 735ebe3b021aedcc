"""Content-addressed blobs sent in chunks: the codec of a chunk, and the store that assembles them.

A blob (graph, weights, update) is named by the sha256 of its bytes. It travels in chunks
below the broker's maximum packet size: the chunk's bytes are the MQTT payload, its
header (blob hash, index, count, offset, total size, chunk hash) is in MQTT 5 user
properties. The receiver writes each chunk at its offset into a partial file on disk and
logs its index, so a transfer interrupted by a disconnect or a crash resumes with only the
missing chunks. Every chunk is checked against its hash before it is written, the whole
blob against its name before it is renamed into the store; a blob is never half-present.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from edge_runtime.errors import IntegrityError
from edge_runtime.store import sha256_file
from edge_runtime.wire.protocol import ProtocolError, check_sha

DEFAULT_CHUNK_BYTES = 120 * 1024      # under the smallest common cloud limit (AWS IoT Core: 128 KB)
PACKET_HEADROOM_BYTES = 4096          # topic, properties and MQTT framing around a chunk
DEFAULT_MAX_BLOB_BYTES = 2 << 30
_SYNC_EVERY_CHUNKS = 32


def chunk_bytes_for(max_packet_bytes: int | None, preferred: int = DEFAULT_CHUNK_BYTES) -> int:
    """Chunk size that fits the broker's announced maximum packet size (paho does not enforce it)."""
    if not max_packet_bytes:
        return preferred
    size = min(preferred, max_packet_bytes - PACKET_HEADROOM_BYTES)
    if size < 1024:
        raise ProtocolError(f"the broker's maximum packet size ({max_packet_bytes} bytes) leaves no room for chunks")
    return size


@dataclass(frozen=True)
class ChunkHeader:
    blob: str            # sha256 of the whole blob
    index: int
    count: int
    offset: int
    size: int            # size of the whole blob
    chunk_sha256: str

    def to_properties(self) -> list[tuple[str, str]]:
        return [("blob", self.blob), ("index", str(self.index)), ("count", str(self.count)),
                ("offset", str(self.offset)), ("size", str(self.size)), ("chunk_sha256", self.chunk_sha256)]

    @classmethod
    def from_properties(cls, pairs) -> "ChunkHeader":
        """From MQTT 5 user properties; ProtocolError names what is missing or malformed."""
        try:
            props = dict(pairs or [])
        except (TypeError, ValueError):
            raise ProtocolError("chunk: user properties must be name/value pairs") from None
        missing = [k for k in ("blob", "index", "count", "offset", "size", "chunk_sha256") if k not in props]
        if missing:
            raise ProtocolError(f"chunk: missing user properties {missing}")
        index, count, offset, size = (_number(props[k], k) for k in ("index", "count", "offset", "size"))
        h = cls(check_sha(props["blob"], "chunk: blob"), index, count, offset, size,
                check_sha(props["chunk_sha256"], "chunk: chunk_sha256"))
        # every chunk holds a byte at least, so a blob has no more chunks than bytes (an empty one has one)
        if not (0 <= h.index < h.count <= max(h.size, 1)) or h.offset < 0 or h.size < 0 or h.offset > h.size:
            raise ProtocolError(f"chunk: index {h.index} of {h.count} at offset {h.offset} of {h.size} is inconsistent")
        return h


_NUMBER = re.compile(r"[0-9]{1,13}")    # ASCII digits only (str.isdigit takes '²' and '١'); 13 digits: < 2**44


def _number(text, name: str) -> int:
    """A header number: a string of 1 to 13 ASCII digits, as to_properties writes it."""
    if not isinstance(text, str) or not _NUMBER.fullmatch(text):
        shown = repr(text) if isinstance(text, str) and len(text) <= 20 else type(text).__name__
        raise ProtocolError(f"chunk: index, count, offset and size must be non-negative integers of 1 to 13 ASCII "
                            f"digits; {name} is {shown}")
    return int(text)


def chunks_of(path: Path, chunk_bytes: int, indices=None) -> Iterator[tuple[ChunkHeader, bytes]]:
    """The chunks of a stored blob (all, or the given indices), read one at a time."""
    size = os.path.getsize(path)
    blob = Path(path).name.split(".")[0]
    count = max(1, math.ceil(size / chunk_bytes))
    wanted = range(count) if indices is None else sorted({i for i in indices if 0 <= i < count})
    with open(path, "rb") as f:
        for i in wanted:
            f.seek(i * chunk_bytes)
            data = f.read(chunk_bytes)
            yield ChunkHeader(blob, i, count, i * chunk_bytes, size, hashlib.sha256(data).hexdigest()), data


REMOVING = ".removing-"    # a directory of blobs set aside to be deleted (BlobStore.remove_complete)


class BlobStore:
    """Blobs on disk named by their sha256; partial blobs assembled chunk by chunk, across restarts."""

    def __init__(self, root: Path, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES, shared: bool = False):
        """shared: other processes (coordinator replicas) receive chunks of the same blobs into this directory,
        so each chunk is taken under a lock on the store and the chunk log is read afresh."""
        self.root = Path(root)
        self.partial = self.root / "partial"
        self.partial.mkdir(parents=True, exist_ok=True)
        self.max_blob_bytes = max_blob_bytes
        self.shared = shared
        # chunk indices received per blob being assembled, read from its .log once: a chunk then costs the
        # same however many came before it (re-reading the log made a flood of tiny chunks quadratic)
        self._received: dict[str, set[int]] = {}
        # blobs this process assembled and hashed, with the file's (size, mtime, inode) then: unchanged since,
        # they need no second hash (a restart, or another replica's blob, is hashed again)
        self._assembled: dict[str, tuple[int, int, int]] = {}
        for aside in self.root.glob(REMOVING + "*"):     # blobs a stopped process had set aside to delete
            shutil.rmtree(aside, ignore_errors=True)

    def path(self, sha: str) -> Path:
        return self.root / check_sha(sha, "blob")

    def has(self, sha: str) -> bool:
        return self.path(sha).exists()

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self.has(sha):
            tmp = self.partial / f"{sha}.put"
            tmp.write_bytes(data)
            os.replace(tmp, self.path(sha))
        return sha

    def put_file(self, src: Path) -> str:
        """Copy a file into the store under its hash (streamed: never whole in memory)."""
        sha = sha256_file(src)
        if not self.has(sha):
            import shutil
            tmp = self.partial / f"{sha}.put"
            shutil.copyfile(src, tmp)
            os.replace(tmp, self.path(sha))
        return sha

    # -- assembling a blob from chunks ---------------------------------------------------
    def _state(self, sha: str) -> tuple[Path, Path, Path]:
        return self.partial / f"{sha}.part", self.partial / f"{sha}.meta", self.partial / f"{sha}.log"

    def received(self, sha: str) -> set[int]:
        if sha not in self._received:
            _, _, log = self._state(sha)
            self._received[sha] = {int(line) for line in log.read_text().split() if line.isdigit()} \
                if log.exists() else set()
        return self._received[sha]

    def missing_chunks(self, sha: str) -> list[int] | None:
        """Indices still needed for a blob being assembled; None when nothing is known about it yet."""
        if self.has(sha):
            return []
        _, meta, _ = self._state(sha)
        if not meta.exists():
            return None
        count = json.loads(meta.read_text())["count"]
        got = self.received(sha)
        return [i for i in range(count) if i not in got]

    def receive(self, header: ChunkHeader, data: bytes) -> bool:
        """Store one chunk; True once the whole blob is present and verified.

        Duplicates are harmless. A chunk whose bytes do not match its hash, or whose header
        contradicts what earlier chunks said, is refused (ProtocolError) and not written.
        """
        if not self.shared:
            return self._receive(header, data)
        import fcntl
        with open(self.partial / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)     # released by the kernel if the process dies holding it
            self._received.pop(header.blob, None)   # another process may have added chunks
            return self._receive(header, data)

    def _receive(self, header: ChunkHeader, data: bytes) -> bool:
        sha = header.blob
        if self.has(sha):
            return True
        if header.size > self.max_blob_bytes:
            raise ProtocolError(f"blob {sha[:12]}… of {header.size} bytes exceeds the limit of {self.max_blob_bytes}")
        if not data or header.offset + len(data) > header.size:
            raise ProtocolError(f"chunk {header.index} of blob {sha[:12]}…: {len(data)} bytes at offset "
                                f"{header.offset} do not fit a blob of {header.size}")
        if hashlib.sha256(data).hexdigest() != header.chunk_sha256:
            raise ProtocolError(f"chunk {header.index} of blob {sha[:12]}…: bytes do not match chunk_sha256")
        part, meta, log = self._state(sha)
        if meta.exists():
            known = json.loads(meta.read_text())
            if (known["size"], known["count"]) != (header.size, header.count):
                raise ProtocolError(f"chunk {header.index} of blob {sha[:12]}… says size {header.size} in "
                                    f"{header.count} chunks; earlier chunks said {known['size']} in {known['count']}")
        else:
            with open(part, "wb") as f:
                f.truncate(header.size)
            tmp = meta.with_suffix(".meta.tmp")
            tmp.write_text(json.dumps({"size": header.size, "count": header.count}))
            os.replace(tmp, meta)
        fd = os.open(part, os.O_WRONLY)
        try:
            os.pwrite(fd, data, header.offset)
            got = self.received(sha)
            got.add(header.index)
            if len(got) % _SYNC_EVERY_CHUNKS == 0 or len(got) == header.count:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        with open(log, "a") as f:
            f.write(f"{header.index}\n")
        if len(got) < header.count:
            return False
        actual = sha256_file(part)
        if actual != sha:
            self.discard(sha)
            raise IntegrityError(f"blob {sha[:12]}… assembled to sha256 {actual[:12]}…; discarded, fetch it again")
        os.replace(part, self.path(sha))
        self._assembled[sha] = _signature(self.path(sha))
        meta.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        self._received.pop(sha, None)
        return True

    def hashed_unchanged(self, sha: str) -> bool:
        """True when this process assembled the blob and hashed it, and its file has not changed since (same size,
        modification time and inode): reading it to hash it again would find the same bytes."""
        known = self._assembled.get(sha)
        try:
            return known is not None and _signature(self.path(sha)) == known
        except OSError:
            return False

    def discard(self, sha: str) -> None:
        """Forget a blob being assembled (its partial file, header and chunk log)."""
        self._received.pop(sha, None)
        for p in self._state(sha):
            p.unlink(missing_ok=True)

    def remove(self, sha: str) -> None:
        """Delete a blob, complete or being assembled."""
        self.discard(sha)
        self.path(sha).unlink(missing_ok=True)

    def remove_complete(self, later: Callable | None = None) -> int:
        """Delete every complete blob (partial ones stay); how many. With `later` (an executor's submit) the
        deleting is done there: the blobs are renamed aside now, so that the store holds none of them from here
        on and a blob that comes again meanwhile is a new file (unlinking 1,000 updates took a round's close
        0.3 s)."""
        doomed = [p for p in self.root.iterdir() if p.is_file() and len(p.name) == 64]
        self._assembled.clear()
        if later is None or not doomed:
            for path in doomed:
                path.unlink(missing_ok=True)
            return len(doomed)
        aside = Path(tempfile.mkdtemp(prefix=REMOVING, dir=self.root))
        for path in doomed:
            try:
                os.replace(path, aside / path.name)
            except FileNotFoundError:          # another replica removed it first
                pass
        later(shutil.rmtree, aside, True)
        return len(doomed)

    def expire_partials(self, older_than_s: float) -> int:
        """Delete partial blobs no chunk has reached for older_than_s (by the files' times); how many."""
        import time
        now, stale = time.time(), set()
        for path in self.partial.iterdir():
            if "." not in path.name:   # the shared store's lock file
                continue
            try:
                if now - path.stat().st_mtime >= older_than_s:
                    stale.add(path.name.split(".")[0])
            except FileNotFoundError:
                continue
        for sha in stale:
            self.discard(sha)
        return len(stale)


def _signature(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino
