"""CSI Identity service, served by the controller and the node plugin alike."""

from __future__ import annotations

import logging
from typing import Callable

from google.protobuf.wrappers_pb2 import BoolValue

from csi import __version__
from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc

log = logging.getLogger(__name__)
Service = csi.PluginCapability.Service


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, driver_name: str, probe: Callable[[], str | None]):
        """`probe` returns None when ready, else what is missing (reported in the log, not ready)."""
        self.driver_name = driver_name
        self.probe = probe

    def GetPluginInfo(self, request, context):
        return csi.GetPluginInfoResponse(name=self.driver_name, vendor_version=__version__)

    def GetPluginCapabilities(self, request, context):
        # The plugin as a whole has a controller service, so the node plugin says so too (as csi-sanity and
        # other tools that ask the node endpoint expect); only the controller deployment serves it.
        caps = [Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS]
        return csi.GetPluginCapabilitiesResponse(capabilities=[
            csi.PluginCapability(service=csi.PluginCapability.Service(type=c)) for c in caps] + [
            csi.PluginCapability(volume_expansion=csi.PluginCapability.VolumeExpansion(
                type=csi.PluginCapability.VolumeExpansion.ONLINE))])

    def Probe(self, request, context):
        missing = self.probe()
        if missing:
            log.warning("not ready: %s", missing)
        return csi.ProbeResponse(ready=BoolValue(value=missing is None))


# The upstream sidecars (csi-lib-utils) give a new connection to the driver's socket about one second to finish
# its HTTP/2 handshake (their reconnect backoff, 1 s at most, is also their connect deadline), and a sidecar
# whose connection was up once and then failed exits ("Lost connection to CSI driver"). A driver that listens
# but is still busy starting (on a loaded node) therefore costs each sidecar a restart. PROMPT is that budget
# with a margin; STEADY answers in a row say the start-up burst is over.
PROMPT = 0.5
STEADY = 3


def wait_until_answering(path: str, timeout: float, prompt: float = PROMPT, steady: int = STEADY) -> bool:
    """True once the CSI driver on the unix socket `path` answered Probe on a new connection within `prompt`
    seconds, `steady` times in a row; False when `timeout` seconds passed first. Whether the driver says it is
    ready does not matter here: the sidecars wait for that themselves, over a connection that stays up."""
    import time

    import grpc
    deadline = time.monotonic() + timeout
    in_a_row, last = 0, "no attempt"
    while time.monotonic() < deadline:
        started = time.monotonic()
        with grpc.insecure_channel("unix:" + path) as channel:
            try:
                csi_pb2_grpc.IdentityStub(channel).Probe(csi.ProbeRequest(), timeout=prompt)
                in_a_row, last = in_a_row + 1, f"answered in {time.monotonic() - started:.2f}s"
            except grpc.RpcError as exc:
                in_a_row, last = 0, f"{exc.code().name}: {exc.details()}"
        if in_a_row >= steady:
            return True
        time.sleep(0.2)
    log.error("the driver on %s did not answer Probe within %.1fs %d times in a row in %.0fs (last: %s)",
              path, prompt, steady, timeout, last)
    return False
