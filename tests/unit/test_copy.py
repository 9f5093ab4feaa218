"""The content copy's verification (issue 12, defect 8): both ends hash the stream (the source's bytes as
read, the destination's bytes as written), the destination writes with O_DIRECT and flushes, and nothing is
read back through the page cache to "verify" afterwards."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from csi.storage import copy

MiB = 1 << 20


def stream_of(content: bytes, skip_zeros: bool = True, digest: str | None = None):
    """What a sender sends: data chunks (zero chunks left out, as ReadData does), then size and SHA-256."""
    for offset in range(0, len(content), copy.CHUNK):
        data = content[offset:offset + copy.CHUNK]
        if data.count(0) == len(data) and skip_zeros:
            continue
        yield offset, data, ""
    yield len(content), None, digest or hashlib.sha256(content).hexdigest()


@pytest.fixture
def content() -> bytes:
    # data, a hole, data: the hole is not sent
    return os.urandom(MiB) + bytes(2 * MiB) + os.urandom(MiB)


@pytest.mark.parametrize("sparse", [True, False])
def test_what_is_written_is_hashed_on_the_way_and_matches_the_source(tmp_path, content, sparse):
    dst = tmp_path / "dst"
    dst.write_bytes(b"\xff" * len(content))      # a destination that held something: holes must become zeros
    digest = copy.write_stream(str(dst), len(content), stream_of(content), sparse=sparse,
                               progress=copy.Progress(len(content)))
    assert digest == hashlib.sha256(content).hexdigest()
    assert dst.read_bytes() == content


def test_a_stream_that_does_not_match_the_senders_digest_fails(tmp_path, content):
    dst = tmp_path / "dst"
    dst.write_bytes(bytes(len(content)))
    with pytest.raises(copy.NotVerified):
        copy.write_stream(str(dst), len(content), stream_of(content, digest="0" * 64), sparse=True,
                          progress=copy.Progress(len(content)))


def test_nothing_is_read_back_to_verify(tmp_path, content, monkeypatch):
    """The read-back read the page cache, not the disk: the hash is taken on the stream instead, once."""
    dst = tmp_path / "dst"
    dst.write_bytes(bytes(len(content)))
    assert not hasattr(copy, "digest_of"), "a second pass over the copied data is still there"
    reads = []
    for name in ("pread", "preadv", "read", "readv"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, real=real, name=name: reads.append((name, a)) or real(*a))
    copy.write_stream(str(dst), len(content), stream_of(content, skip_zeros=False), sparse=False,
                      progress=copy.Progress(len(content)))
    assert reads == []


def test_a_block_device_is_written_with_o_direct_and_flushed(tmp_path, content, monkeypatch):
    dst = tmp_path / "dst"
    dst.write_bytes(bytes(len(content)))
    opened, synced = [], []
    real_open = os.open
    monkeypatch.setattr(copy, "_is_block_device", lambda path: True)

    def fake_open(path, flags, *args):
        opened.append((str(path), flags))
        return real_open(path, flags & ~os.O_DIRECT, *args)   # tmpfs refuses O_DIRECT; the flag is what counts

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    copy.write_stream(str(dst), len(content), stream_of(content), sparse=False, progress=copy.Progress(len(content)))
    writes = [flags for path, flags in opened if path == str(dst) and flags & (os.O_WRONLY | os.O_RDWR)]
    assert writes and all(flags & os.O_DIRECT for flags in writes), opened
    assert synced, "the destination was not flushed"


def test_the_sender_hashes_what_it_reads(tmp_path, content):
    src = tmp_path / "src"
    src.write_bytes(content)
    sent = list(copy.sparse_stream(str(src), len(content)))
    assert sent[-1] == (len(content), None, hashlib.sha256(content).hexdigest())
    assert [o for o, d, _ in sent[:-1] if d is None] == [MiB, 2 * MiB]     # zero chunks marked, not sent


def test_a_sender_from_an_offset_sends_the_content_from_there_counted_from_0(tmp_path, content):
    """A plain volume from a replicated volume's leg: the data starts 1 MiB in, past md's superblock and bitmap;
    what is sent (and hashed) is the content from there, and lands at 0."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"\xa5" * MiB + content)
    dst.write_bytes(bytes(len(content)))
    sent = list(copy.sparse_stream(str(src), len(content), start=MiB))
    assert sent[-1] == (len(content), None, hashlib.sha256(content).hexdigest())
    copy.write_stream(str(dst), len(content), iter(sent), sparse=True, progress=copy.Progress(len(content)))
    assert dst.read_bytes() == content


@pytest.mark.parametrize("offset, size, ok", [(MiB, 0, True), (MiB, 2 * MiB, True), (MiB, 4 * MiB, False),
                                              (100, 0, False), (5 * MiB, 0, False), (0, -1, False)])
def test_read_data_sends_only_what_the_lv_holds_from_an_aligned_offset(monkeypatch, offset, size, ok):
    from types import SimpleNamespace

    from csi import errors
    from csi.proto import agent_pb2 as apb
    from csi.storage import transfer
    lv = SimpleNamespace(path="/dev/vg/lv", attr="Vwi-a-tz--", active=True)
    service = SimpleNamespace(lvm=SimpleNamespace(lv=lambda vg, name: lv), _ours=lambda lv, kind: True,
                              config=SimpleNamespace(node_name="s1"))
    monkeypatch.setattr(transfer.snapshots, "is_split", lambda lv: False)
    monkeypatch.setattr(transfer.snapshots, "is_cow", lambda lv: False)
    monkeypatch.setattr(copy, "device_size", lambda path: 4 * MiB)
    asked = []
    monkeypatch.setattr(copy, "sparse_stream", lambda path, n, start: asked.append((n, start)) or
                        iter([(n, None, "digest")]))
    request = apb.ReadDataRequest(vg="vg", lv="lv", offset_bytes=offset, size_bytes=size)
    if not ok:
        with pytest.raises(errors.CsiError) as e:
            list(transfer.read_data(service, request))
        assert e.value.code == errors.Code.INVALID_ARGUMENT and asked == []
        return
    [done] = list(transfer.read_data(service, request))
    assert asked == [(size or 4 * MiB - offset, offset)] and done.done and done.size_bytes == asked[0][0]


def test_prefetch_keeps_order_and_reads_ahead_while_the_consumer_works():
    pulled = []

    def source():
        for i in range(10):
            pulled.append(i)
            yield i

    stream = copy.prefetch(source(), depth=3)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(pulled) < 5 and time.monotonic() < deadline:   # the consumer holds item 0; 3 wait, 1 in hand
        time.sleep(0.01)
    assert len(pulled) == 5, pulled
    assert list(stream) == list(range(1, 10))


def test_prefetch_raises_the_producers_error_at_its_place_in_the_stream():
    def source():
        yield 1
        yield 2
        raise OSError("read error at 2 MiB")

    got = []
    with pytest.raises(OSError, match="read error at 2 MiB"):
        for item in copy.prefetch(source()):
            got.append(item)
    assert got == [1, 2]


def test_a_consumer_that_stops_early_stops_and_closes_the_producer():
    closed = threading.Event()

    def source():
        try:
            for i in range(1000):
                yield i
        finally:
            closed.set()

    stream = copy.prefetch(source(), depth=2)
    assert next(stream) == 0
    stream.close()
    assert closed.wait(5), "the source was not closed after its consumer stopped"
