"""Copying a volume's content: locally between LVs, or from another storage node's agent over mutual TLS.

Sparse-aware: chunks of zeros are neither sent nor written into a thin destination (thin pools zero new
blocks), but still hashed, so both sides compute the SHA-256 of the whole logical content and the receiver
verifies what it wrote by reading it back. A copy runs as a job in the agent, apart from the RPC that
started it: a retried CreateVolume joins the job in progress instead of starting another, and a copy
outlasts the provisioner's RPC timeout.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from csi import faults

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ZERO = bytes(CHUNK)


@dataclass
class Progress:
    total: int
    done: int = 0
    started: float = 0.0

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0


def chunks(path: str, size: int) -> Iterator[tuple[int, bytes]]:
    """(offset, data) of every CHUNK-sized piece of the first `size` bytes of a block device."""
    with open(path, "rb", buffering=0) as f:
        offset = 0
        while offset < size:
            data = f.read(min(CHUNK, size - offset))
            if not data:
                raise IOError(f"{path}: short read at {offset} of {size}")
            yield offset, data
            offset += len(data)


def sparse_stream(path: str, size: int) -> Iterator[tuple[int, bytes | None, str]]:
    """What a sender sends: (offset, data or None for zeros, "" ) ... then (size, None, sha256)."""
    digest = hashlib.sha256()
    for offset, data in chunks(path, size):
        digest.update(data)
        yield offset, (None if data == ZERO[:len(data)] else data), ""
    yield size, None, digest.hexdigest()


def write_stream(dst: str, size: int, stream: Iterable[tuple[int, bytes | None, str]], sparse: bool,
                 progress: Progress) -> str:
    """Writes what a sender sends into dst; returns the sender's SHA-256 of the whole content."""
    fd = os.open(dst, os.O_WRONLY)
    source_digest = ""
    try:
        for offset, data, final in stream:
            if final:
                source_digest = final
                break
            if data is None and not sparse:
                data = ZERO[:min(CHUNK, size - offset)]
            if data is not None:
                os.pwrite(fd, data, offset)
                faults.step("copy.chunk")
            progress.done = min(size, offset + CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)
    if not source_digest:
        raise IOError("the sender stopped before sending its checksum")
    return source_digest


def digest_of(path: str, size: int) -> str:
    d = hashlib.sha256()
    for _, data in chunks(path, size):
        d.update(data)
    return d.hexdigest()


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
            log.info("copy into %s: done, %d bytes in %.1fs (%.1f MB/s), verified", key, progress.total, took,
                     progress.total / took / 1e6 if took else 0.0)
        finally:
            stop.set()

    def get(self, key: str) -> Future | None:
        with self._mutex:
            return self._jobs.get(key)

    def progress(self, key: str) -> Progress | None:
        with self._mutex:
            job = self._jobs.get(key)
            return self._progress.get(key) if job is not None and not job.done() else None

    def forget(self, key: str) -> None:
        with self._mutex:
            self._jobs.pop(key, None)
            self._progress.pop(key, None)
