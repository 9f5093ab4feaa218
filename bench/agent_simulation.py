"""Simulated storage agents for the scale benchmark (bench/scale.py), and nothing else: this module is a
SIMULATION, used only by bench/.

What is real: each simulated agent is the real `csi.storage.service.AgentService` (its locks, validation,
capacity bookkeeping, listings and paging), served by a real gRPC server with the real interceptor
(`csi.server.CallInterceptor`) on its own TCP port, with mutual TLS; and its per-volume records
(`csi.storage.records.RecordStore`: one small JSON file per volume, written atomically with fsync) on disk
under the benchmark's work directory.

What is simulated: LVM (`SimulatedLvm`, in place of `csi.storage.lvm.Lvm`) and the LIO target
(`SimulatedLio`, in place of `csi.storage.lio.Lio`), both in memory, answering at once. So the figures
measure the controller and the agents' own Python, never lvcreate (0.8 s to 1.4 s on a real node) or
configfs; a real storage node is slower, and the figures say nothing about it.

Several simulated agents share one process (`serve`), so that 100 of them on two CPUs cost a few
interpreters, not 100: the controller is what is measured.

Run by bench/scale.py as `python bench/agent_simulation.py --first 0 --count 25 ...`; it writes
{node name: address} to --ready-file once every agent listens, and on SIGTERM writes the largest response
of each agent RPC (bytes, as serialised) to --stats-file and stops.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Sequence

import grpc

from csi import server
from csi.config import AgentConfig, PoolConfig
from csi.fsutil import write_atomic
from csi.proto import agent_pb2_grpc
from csi.runner import CommandError
from csi.storage.lio import AclState, Portal
from csi.storage.lvm import LogicalVolume, ThinPoolFill, ThinPoolState, VolumeGroup
from csi.storage.records import RecordStore
from csi.storage.service import AgentService
from csi.tls import TestPki

GiB, TiB = 1 << 30, 1 << 40
EXTENT = 4 << 20
VG = "simvg"
THIN_POOL = "simpool"
POOL = "thin"
# Enough simulated space that no run of the benchmark fills a pool: placement is by most space available,
# and the benchmark is about the controller's cost, not about a full pool.
VG_BYTES = 64 * TiB
THIN_POOL_BYTES = 32 * TiB
CLUSTER_ID = "bench"


class SimulatedLvm:
    """csi.storage.lvm.Lvm in memory, for the benchmark only: the same methods and the same answers
    (frozen dataclasses, sizes in bytes), the same CommandError for "already exists" (exit 5 and LVM's
    words, which the agent recognises), no commands run. One VG holding one thin pool."""

    def __init__(self) -> None:
        self._lvs: dict[tuple[str, str], LogicalVolume] = {}
        self._mutex = threading.Lock()
        self._lvs[(VG, THIN_POOL)] = LogicalVolume(VG, THIN_POOL, THIN_POOL_BYTES, (), "", "twi-aotz--",
                                                   0.5, 1.0, created=time.time())

    # ---- the kernel's side

    def device_node_exists(self, path: str) -> bool:
        """/dev/<vg>/<lv> exists exactly while the LV is active, as with the real LVM (udev_rules = 0)."""
        vg, _, name = path.removeprefix("/dev/").partition("/")
        with self._mutex:
            lv = self._lvs.get((vg, name))
        return lv is not None and lv.active

    # ---- reads

    def configure(self, devices: Sequence[str], state_dir: Path) -> None:
        pass

    def vg(self, name: str) -> VolumeGroup | None:
        if name != VG:
            return None
        with self._mutex:
            used = sum(lv.size for lv in self._lvs.values() if not lv.pool)
            count = len(self._lvs)
        return VolumeGroup(VG, VG_BYTES, VG_BYTES - used, EXTENT, count)

    def lv(self, vg: str, name: str) -> LogicalVolume | None:
        with self._mutex:
            return self._lvs.get((vg, name))

    def lvs(self, vg: str, select: str | None = None) -> list[LogicalVolume]:
        if select:
            raise NotImplementedError("the simulation does not filter with --select")
        with self._mutex:
            return [lv for (g, _), lv in self._lvs.items() if g == vg]

    def thin_pool(self, vg: str, pool: str) -> ThinPoolState | None:
        lv = self.lv(vg, pool)
        if lv is None or not lv.is_thin_pool:
            return None
        return ThinPoolState(vg, pool, lv.size, lv.data_percent or 0.0, lv.metadata_percent or 0.0, True,
                             self.vg(vg))

    def thin_pool_fill(self, vg: str, pool: str) -> ThinPoolFill | None:
        lv = self.lv(vg, pool)
        if lv is None or not lv.is_thin_pool:
            return None
        return ThinPoolFill(lv.size, lv.data_percent or 0.0, lv.metadata_percent or 0.0)

    # ---- writes

    def create(self, vg: str, name: str, size: int, tags: Sequence[str], thin_pool: str = "") -> None:
        argv = ["lvcreate", "--name", name, vg]
        with self._mutex:
            if (vg, name) in self._lvs:
                raise CommandError(argv, 5, f'  Logical Volume "{name}" already exists in volume group "{vg}"\n')
            if vg != VG or (thin_pool and (vg, thin_pool) not in self._lvs):
                raise CommandError(argv, 5, f'  Volume group "{vg}" not found\n')
            self._lvs[(vg, name)] = LogicalVolume(vg, name, size, tuple(tags), thin_pool,
                                                  "Vwi-a-tz--" if thin_pool else "-wi-a-----", created=time.time())

    def remove(self, vg: str, name: str) -> None:
        with self._mutex:
            self._lvs.pop((vg, name), None)

    def extend(self, vg: str, name: str, size: int) -> None:
        with self._mutex:
            lv = self._lvs[(vg, name)]
            self._lvs[(vg, name)] = LogicalVolume(lv.vg, lv.name, size, lv.tags, lv.pool, lv.attr,
                                                  origin=lv.origin, created=lv.created)

    def snapshot(self, vg: str, origin: str, name: str, tags: Sequence[str], activate: bool) -> None:
        with self._mutex:
            source = self._lvs[(vg, origin)]
            if (vg, name) in self._lvs:
                raise CommandError(["lvcreate", "--snapshot"], 5,
                                   f'  Logical Volume "{name}" already exists in volume group "{vg}"\n')
            self._lvs[(vg, name)] = LogicalVolume(vg, name, source.size, tuple(tags), source.pool,
                                                  "Vwi-a-tz--" if activate else "Vwi---tz-k", origin=origin,
                                                  created=time.time())

    def activate(self, vg: str, name: str) -> None:
        with self._mutex:
            lv = self._lvs[(vg, name)]
            attr = lv.attr[:4] + "a" + lv.attr[5:]
            self._lvs[(vg, name)] = LogicalVolume(lv.vg, lv.name, lv.size, lv.tags, lv.pool, attr,
                                                  origin=lv.origin, created=lv.created)

    def set_zeroing(self, vg: str, pool: str) -> None:
        pass

    def zero_out(self, path: str) -> None:
        pass


class SimulatedLio:
    """csi.storage.lio.Lio in memory, for the benchmark only: targets, LUN 0 and ACLs in a dict."""

    def __init__(self, portals: Sequence[Portal]) -> None:
        self.portals = tuple(portals)
        self._targets: dict[str, dict] = {}     # iqn -> {"lun": backstore, "acls": {initiator: Access}}
        self._mutex = threading.Lock()

    def export(self, iqn: str, backstore: str, device: str, thin: bool) -> None:
        with self._mutex:
            self._targets.setdefault(iqn, {"lun": backstore, "acls": {}})

    def unexport(self, iqn: str, backstore: str) -> None:
        with self._mutex:
            self._targets.pop(iqn, None)

    def remove_target(self, iqn: str) -> None:
        self.unexport(iqn, "")

    def is_exported(self, iqn: str) -> bool:
        with self._mutex:
            return iqn in self._targets

    def exported_iqns(self, prefix: str) -> list[str]:
        with self._mutex:
            return sorted(i for i in self._targets if i.startswith(prefix))

    def grant(self, iqn: str, access) -> None:
        with self._mutex:
            target = self._targets.get(iqn)
            if target is None:
                raise LookupError(f"target {iqn} is not exported")
            target["acls"][access.initiator] = access

    def revoke(self, iqn: str, initiator: str) -> int:
        with self._mutex:
            target = self._targets.get(iqn)
            if target is not None:
                target["acls"].pop(initiator, None)
        return 0

    def acls(self, iqn: str) -> list[AclState]:
        with self._mutex:
            target = self._targets.get(iqn) or {"acls": {}}
            return [AclState(a.initiator, a.read_only, False) for a in target["acls"].values()]


class ResponseSizes(grpc.ServerInterceptor):
    """Records the largest response of each RPC (serialised bytes), to check that no message of the
    listings grows with the number of volumes. Outside the real interceptor: it sees what goes on the wire."""

    def __init__(self) -> None:
        self.largest: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._mutex = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def call(request, context):
            response = inner(request, context)
            size = response.ByteSize()
            with self._mutex:
                self.calls[method] = self.calls.get(method, 0) + 1
                if size > self.largest.get(method, -1):
                    self.largest[method] = size
            return response

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    def stats(self) -> dict:
        with self._mutex:
            return {"largest": dict(self.largest), "calls": dict(self.calls)}


def simulated_agent(index: int, state_root: Path, pki: TestPki, sizes: ResponseSizes
                    ) -> tuple[str, str, grpc.Server, AgentService]:
    """One simulated storage node: the real AgentService over SimulatedLvm and SimulatedLio, records on disk,
    served with mutual TLS on a free port of 127.0.0.1. Returns (node name, address, server, service)."""
    name = f"sim-{index:03d}"
    tls_dir = pki.ensure("agent", name)   # its own certificate, naming its node, as every agent has
    state_dir = state_root / name
    state_dir.mkdir(parents=True, exist_ok=True)
    portal = Portal(f"10.99.{index // 250}.{index % 250 + 1}")    # never contacted: no initiator logs in
    config = AgentConfig(node_name=name, listen="127.0.0.1:0", portals=(portal,), state_dir=state_dir,
                         cluster_id=CLUSTER_ID, tls_dir=tls_dir,
                         pools=(PoolConfig(POOL, VG, THIN_POOL, overprovision_ratio=1.0),),
                         devices=("/dev/simulated",))
    lvm = SimulatedLvm()
    service = AgentService(config, lvm, SimulatedLio(config.portals), RecordStore(state_dir / "volumes"),
                           device_node_exists=lvm.device_node_exists)
    service.restore()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=16), interceptors=[sizes, server.CallInterceptor()],
                      options=[("grpc.so_reuseport", 0)] + server.KEEPALIVE_OPTIONS)
    agent_pb2_grpc.add_AgentServicer_to_server(service, srv)
    port = srv.add_secure_port("127.0.0.1:0", server.TlsFiles(tls_dir).server_credentials())
    if port == 0:
        raise OSError(f"simulated agent {name}: cannot listen")
    srv.start()
    return name, f"127.0.0.1:{port}", srv, service


def serve(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="simulated storage agents (benchmark only)")
    p.add_argument("--first", type=int, required=True, help="index of the first simulated agent")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--pki", type=Path, required=True, help="the throw-away PKI (csi/tls.py) whose CA signs them")
    p.add_argument("--ready-file", type=Path, required=True)
    p.add_argument("--stats-file", type=Path, required=True)
    a = p.parse_args(argv)
    # The agent logs every call at info; at thousands of calls a second that is the simulation's own cost.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sizes = ResponseSizes()
    pki = TestPki(a.pki)
    agents = [simulated_agent(i, a.state_dir, pki, sizes) for i in range(a.first, a.first + a.count)]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    write_atomic(a.ready_file, json.dumps({name: address for name, address, _, _ in agents}), mode=0o644)
    stop.wait()
    for _, _, srv, _ in agents:
        srv.stop(grace=1)
    write_atomic(a.stats_file, json.dumps(sizes.stats()), mode=0o644)
    return 0


if __name__ == "__main__":
    sys.exit(serve())
