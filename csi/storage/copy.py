"""Copying a volume's content: locally between LVs, or from another storage node's agent over mutual TLS.

What is verified, exactly: the sender hashes (SHA-256) the bytes it reads from the source device, the
receiver hashes the bytes it writes to the destination device, both on the stream, and the copy succeeds only
when the two digests are equal. Both ends go around the page cache with O_DIRECT (aligned buffers), so the
sender hashes what the source device holds and the receiver's writes reach the device; the destination is
flushed (fsync) before the copy counts as done. The destination is not read back afterwards: that would be a
second pass over the data (and, buffered, it read the page cache, not the disk).

Sparse-aware: chunks of zeros are not sent (the receiver counts the gaps as zeros in its hash). A thin
destination is not written where the source holds zeros, as a new thin LV reads zeros there; the receiver
checks that it does (a retried copy may meet what an earlier one wrote) and writes zeros only where not. A
copy runs as a job in the agent, apart from the RPC that started it: a retried CreateVolume joins the job in
progress instead of starting another, and a copy outlasts the provisioner's RPC timeout.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import queue
import stat
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from csi import faults
from csi.fsutil import device_size  # noqa: F401  (copy.device_size: what the agent's copies and reads ask)

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ALIGN = 4096            # O_DIRECT wants offsets, lengths and buffers aligned to the logical block size
ZERO = bytes(CHUNK)


class NotVerified(Exception):
    """The bytes written are not the bytes the sender read (their SHA-256 digests differ)."""


@dataclass
class Progress:
    total: int
    done: int = 0
    started: float = 0.0

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0


def _is_block_device(path: str) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


class _Device:
    """A block device opened with O_DIRECT, read and written through one page-aligned buffer. A piece whose
    length is not a multiple of ALIGN (never one of an LV, a whole number of extents) goes through a second,
    buffered descriptor. Regular files (the unit tests; tmpfs refuses O_DIRECT) are opened without it."""

    def __init__(self, path: str, flags: int):
        self.path = path
        self._flags = flags
        self.fd = os.open(path, flags | (os.O_DIRECT if _is_block_device(path) else 0))
        self._plain: int | None = None
        self._buf = mmap.mmap(-1, CHUNK)

    def _fd_for(self, n: int) -> int:
        if n % ALIGN == 0:
            return self.fd
        if self._plain is None:
            self._plain = os.open(self.path, self._flags)
        return self._plain

    def read(self, offset: int, n: int) -> bytes:
        view = memoryview(self._buf)[:n]
        try:
            got = os.preadv(self._fd_for(n), [view], offset)
            if got != n:
                raise IOError(f"{self.path}: short read at {offset}: {got} of {n} bytes")
            return bytes(view)
        finally:
            view.release()

    def write(self, offset: int, data: bytes) -> None:
        n = len(data)
        view = memoryview(self._buf)[:n]
        try:
            view[:] = data
            done = os.pwritev(self._fd_for(n), [view], offset)
            if done != n:
                raise IOError(f"{self.path}: short write at {offset}: {done} of {n} bytes")
        finally:
            view.release()

    def flush(self) -> None:
        os.fsync(self.fd)
        if self._plain is not None:
            os.fsync(self._plain)

    def close(self) -> None:
        for fd in (self.fd, self._plain):
            if fd is not None:
                os.close(fd)
        self._buf.close()


def chunks(path: str, size: int, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of every CHUNK-sized piece of the `size` bytes of a block device from `start` on (a
    multiple of ALIGN; offsets counted from it), read with O_DIRECT: what the device holds, not what a page
    cache remembers."""
    dev = _Device(path, os.O_RDONLY)
    try:
        for offset in range(0, size, CHUNK):
            yield offset, dev.read(start + offset, min(CHUNK, size - offset))
    finally:
        dev.close()


def sparse_stream(path: str, size: int, start: int = 0) -> Iterator[tuple[int, bytes | None, str]]:
    """What a sender sends of the `size` bytes from `start` on: (offset, data or None for zeros, "") ... then
    (size, None, SHA-256 of every byte it read)."""
    digest = hashlib.sha256()
    for offset, data in chunks(path, size, start):
        digest.update(data)
        yield offset, (None if data == ZERO[:len(data)] else data), ""
    yield size, None, digest.hexdigest()


PREFETCH = 4   # chunks read ahead of the consumer (4 MiB a copy)


def prefetch(items: Iterable, depth: int = PREFETCH) -> Iterator:
    """The items of `items`, pulled by a thread of their own up to `depth` ahead: a sender reads and hashes the
    next chunks while gRPC sends this one, a receiver takes the next ones off the network while it writes this
    one (both ends of a copy were one thread, each side idle while the other worked). An exception in the
    producer is raised here, at its place in the stream; a consumer that stops early stops the producer, which
    then closes `items` (a gRPC stream's channel with it)."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(slot: tuple) -> bool:
        """Waits for room, or until the consumer stopped (False)."""
        while not stop.is_set():
            try:
                slots.put(slot, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            outcome = (end, None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            outcome = (end, exc)
        finally:
            if stop.is_set():
                getattr(items, "close", lambda: None)()
        put(outcome)

    worker = threading.Thread(target=produce, name="copy-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = slots.get()
            if item is end:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()


def write_stream(dst: str, size: int, stream: Iterable[tuple[int, bytes | None, str]], sparse: bool,
                 progress: Progress) -> str:
    """Writes what a sender sends into dst (O_DIRECT, then flushed), hashing every byte as written, holes
    included; returns that SHA-256 when it equals the sender's, raises NotVerified when not."""
    dev = _Device(dst, os.O_RDWR)
    digest = hashlib.sha256()
    source_digest = ""
    pos = 0

    def zeros_until(end: int) -> None:
        nonlocal pos
        while pos < end:
            n = min(CHUNK - pos % CHUNK, end - pos)
            digest.update(ZERO[:n])
            # A new thin LV reads zeros where nothing was written; one that an earlier attempt wrote may not.
            if not sparse or dev.read(pos, n) != ZERO[:n]:
                dev.write(pos, ZERO[:n])
            pos += n
            progress.done = pos

    try:
        for offset, data, final in stream:
            if final:
                source_digest = final
                break
            if offset < pos or offset >= size or offset % CHUNK:
                raise IOError(f"the sender sent a chunk at {offset}, expected one at {pos} or later")
            zeros_until(offset)
            if data is None:
                zeros_until(min(size, offset + CHUNK))
                continue
            if len(data) != min(CHUNK, size - offset):
                raise IOError(f"the sender sent {len(data)} bytes at {offset}")
            dev.write(offset, data)
            digest.update(data)
            pos = offset + len(data)
            progress.done = pos
            faults.step("copy.chunk")
        if not source_digest:
            raise IOError("the sender stopped before sending its checksum")
        zeros_until(size)
        dev.flush()
    finally:
        dev.close()
    written = digest.hexdigest()
    if written != source_digest:
        raise NotVerified(f"sha256 of the bytes written {written} != the sender's {source_digest}")
    return written


class CopyJobs:
    """Copy jobs by key (vg/lv of the destination): one at a time per key, joined by retries."""

    def __init__(self, workers: int = 2):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="copy")
        self._jobs: dict[str, Future] = {}
        self._progress: dict[str, Progress] = {}
        self._mutex = threading.Lock()

    def start(self, key: str, total: int, fn: Callable[[Progress], None]) -> Future:
        with self._mutex:
            job = self._jobs.get(key)
            if job is not None and not job.done():
                return job
            progress = Progress(total, started=time.monotonic())
            self._progress[key] = progress
            job = self._pool.submit(self._run, key, fn, progress)
            self._jobs[key] = job
            return job

    def _run(self, key: str, fn: Callable[[Progress], None], progress: Progress) -> None:
        stop = threading.Event()

        def report():
            while not stop.wait(10):
                log.info("copy into %s: %.0f%% of %d bytes", key, progress.percent, progress.total)

        reporter = threading.Thread(target=report, daemon=True)
        reporter.start()
        try:
            fn(progress)
            took = time.monotonic() - progress.started
            log.info("copy into %s: done, %d bytes in %.1fs (%.1f MB/s), sha256 verified on the stream", key,
                     progress.total, took, progress.total / took / 1e6 if took else 0.0)
        finally:
            stop.set()

    def get(self, key: str) -> Future | None:
        with self._mutex:
            return self._jobs.get(key)

    def progress(self, key: str) -> Progress | None:
        with self._mutex:
            job = self._jobs.get(key)
            return self._progress.get(key) if job is not None and not job.done() else None

    def running(self) -> dict[str, Progress]:
        """The progress of every copy in flight, by key (metrics)."""
        with self._mutex:
            return {k: self._progress[k] for k, job in self._jobs.items() if not job.done() and k in self._progress}

    def forget(self, key: str) -> None:
        with self._mutex:
            self._jobs.pop(key, None)
            self._progress.pop(key, None)
