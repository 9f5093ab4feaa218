"""A new volume's content copied in from its source (a snapshot, or a point-in-time snapshot of a volume),
on this storage node or streamed from another node's agent over mutual TLS (ReadData).

The copy runs as a job apart from the CreateVolume that started it (copy.CopyJobs): a retry joins it, and a
copy may outlast the provisioner's RPC timeout. The record stays "copying" (never exported) until the copy
has completed and verified.
"""

from __future__ import annotations

import logging
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from csi import errors, faults, ids, peers, runner
from csi.config import PoolConfig
from csi.proto import agent_pb2 as pb
from csi.proto import agent_pb2_grpc
from csi.server import TlsFiles
from csi.storage import copy, snapshots, tags
from csi.storage.lvm import LogicalVolume
from csi.storage.records import VolumeRecord

log = logging.getLogger(__name__)


FEATURES = ("source-offset",)     # AgentInfo.features: what a controller may ask of this agent


def source_dict(source) -> dict:
    return {"node": source.node, "address": source.address, "vg": source.vg, "lv": source.lv,
            "snapshot": source.snapshot, "size": source.size_bytes, "offset": source.offset_bytes}


def check_offset(offset: int) -> int:
    if offset < 0 or offset % copy.ALIGN:
        raise errors.invalid(f"offset_bytes must be a non-negative multiple of {copy.ALIGN}")
    return offset


def finish(service, rec: VolumeRecord, lv: LogicalVolume, pool: PoolConfig) -> VolumeRecord:
    """Starts or joins the copy into this volume and waits for it while the call's time lasts."""
    key = f"{rec.vg}/{rec.lv}"
    job = service.copies.start(key, int(rec.source.get("size", 0)),
                               lambda progress: _copy(service, rec, lv, pool, progress))
    try:
        job.result(timeout=max(1.0, runner.time_left() - 2.0))
    except FutureTimeout:
        p = service.copies.progress(key)
        raise errors.CsiError(errors.Code.DEADLINE_EXCEEDED,
                              f"copying into {rec.name!r} is in progress ({p.percent if p else 0:.0f}%); "
                              "a retry joins it") from None
    except Exception:
        service.copies.forget(key)   # the next retry starts the copy again from the beginning
        raise
    done = service.records.load(rec.vg, rec.lv)
    return done if done is not None else rec


def _copy(service, rec: VolumeRecord, lv: LogicalVolume, pool: PoolConfig, progress: copy.Progress) -> None:
    src = rec.source
    size, offset = int(src["size"]), int(src.get("offset", 0))
    if src["node"] == service.config.node_name:
        src_lv = service.lvm.lv(src["vg"], src["lv"])
        if src_lv is None:
            raise errors.not_found(f"source {src['vg']}/{src['lv']} is gone")
        _refuse_split(src_lv)
        if not src_lv.active:
            service.lvm.activate(src["vg"], src["lv"])
        if offset + size > copy.device_size(src_lv.path):
            raise errors.invalid(f"source {src['vg']}/{src['lv']} holds less than {offset} + {size} bytes")
        stream = copy.prefetch(copy.sparse_stream(src_lv.path, size, offset))
        if snapshots.is_cow(src_lv):
            stream = _while_intact(service, src_lv, stream)
    else:
        stream = copy.prefetch(_remote_stream(service, src))
    try:
        copy.write_stream(lv.path, size, stream, sparse=pool.thin, progress=progress)
    except copy.NotVerified as exc:
        raise errors.internal(f"copy into {rec.name!r} does not verify: {exc}") from None
    finally:
        stream.close()   # a copy that failed stops its reader now (its device, its channel), not at collection
    # Before the record says ready: an LV still tagged as a copy in progress is never rebuilt as a volume
    # from its tags (rebuild.py), and a retry after a crash here only copies again.
    if lv.tag(tags.CONTENT) == "copy":
        service.lvm.del_tag(rec.vg, rec.lv, tags.tag("content", "copy"))
        faults.step("copy.untagged")
    rec.state = "ready"
    service.records.save(rec)


def _remote_stream(service, src: dict):
    creds = TlsFiles(service.config.tls_dir).channel_credentials()
    # The source agent must present its own node's certificate (csi/peers.py); it checks ours against the
    # copy the controller allowed for this destination (storage/authz.py).
    name = peers.dns_name(peers.AGENT, src["node"])
    options = [("grpc.ssl_target_name_override", name), ("grpc.max_receive_message_length", 8 << 20)]
    with grpc.secure_channel(src["address"], creds, options=options) as channel:
        stub = agent_pb2_grpc.AgentStub(channel)
        offset = int(src.get("offset", 0))
        request = pb.ReadDataRequest(vg=src["vg"], lv=src["lv"])
        if offset:      # else as the agents before offsets asked: the whole LV
            request.offset_bytes, request.size_bytes = offset, int(src["size"])
        for chunk in stub.ReadData(request):
            if chunk.done:
                yield chunk.size_bytes, None, chunk.sha256
                return
            yield chunk.offset, chunk.data, ""


def _refuse_split(lv: LogicalVolume) -> None:
    if snapshots.is_split(lv):
        raise errors.aborted(f"{lv.vg}/{lv.name} is a point-in-time snapshot being dropped, no content to copy")


def _while_intact(service, snap: LogicalVolume, stream):
    """Passes a COW snapshot's content on, and checks before the last message (and after a read error)
    that the snapshot is still valid: one that overflowed no longer holds its point in time."""
    try:
        for item in stream:
            if item[2]:
                _check_intact(service, snap)
            yield item
    except OSError:
        _check_intact(service, snap)   # says why, when this is why
        raise


def _check_intact(service, snap: LogicalVolume) -> None:
    now = service.lvm.lv(snap.vg, snap.name)
    if now is None or now.attr[4:5] == "I" or (now.data_percent or 0.0) >= 100.0:
        raise errors.exhausted(
            f"the point-in-time snapshot {snap.vg}/{snap.name} overflowed: its origin took more writes during "
            f"the copy than its {snap.size} bytes of copy-on-write space hold, so it no longer holds its point in "
            "time; the copy is abandoned and a retry copies from a new one")


def read_data(service, request):
    """ReadData: the content of a volume or snapshot of this cluster, chunks of zeros left out."""
    ids.check_lvm_name(request.vg, "vg")
    ids.check_lvm_name(request.lv, "lv")
    lv = service.lvm.lv(request.vg, request.lv)
    if lv is None or not any(service._ours(lv, k) for k in ("volume", "snapshot", "transfer")):
        raise errors.not_found(f"no volume or snapshot {request.vg}/{request.lv} on {service.config.node_name}")
    _refuse_split(lv)
    if not lv.active:
        service.lvm.activate(request.vg, request.lv)
    size = copy.device_size(lv.path)   # a COW snapshot's LV size is its COW space, not its content's
    offset = check_offset(request.offset_bytes)
    if request.size_bytes < 0 or offset + request.size_bytes > size or offset > size:
        raise errors.invalid(f"{request.vg}/{request.lv} holds {size} bytes: {request.size_bytes} from "
                             f"{offset} are not in it")
    size = request.size_bytes or size - offset
    stream = copy.prefetch(copy.sparse_stream(lv.path, size, offset))
    if snapshots.is_cow(lv):
        stream = _while_intact(service, lv, stream)
    try:
        for offset, data, final in stream:
            if final:
                yield pb.DataChunk(done=True, size_bytes=size, sha256=final)
            elif data is not None:
                yield pb.DataChunk(offset=offset, data=data)
    finally:
        stream.close()
