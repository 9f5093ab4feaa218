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
