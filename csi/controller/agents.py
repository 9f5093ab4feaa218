"""The controller's clients of the storage agents: one mutual-TLS channel per storage node.

Agents are verified by a fixed service name in their certificate (not by IP), so agents on host addresses
need no per-address certificate. A call's timeout is what is left of the CSI call that makes it.
"""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Callable, TypeVar

import grpc

from csi import errors, runner
from csi.config import ControllerConfig, StorageNode
from csi.proto import agent_pb2 as pb
from csi.proto import agent_pb2_grpc
from csi.server import TlsFiles

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes an agent returns that mean "this call, here, now": passed on as they are.
_PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL}


class AgentClient:
    def __init__(self, node: StorageNode, channel: grpc.Channel):
        self.node = node
        self._stub = agent_pb2_grpc.AgentStub(channel)

    def call(self, method: str, request, timeout: float | None = None):
        limit = min(timeout, runner.time_left()) if timeout else runner.time_left()
        try:
            return getattr(self._stub, method)(request, timeout=limit)
        except grpc.RpcError as exc:
            code = exc.code()
            detail = exc.details() or ""
            if code in _PASS_THROUGH:
                raise errors.CsiError(code, f"storage node {self.node.name}: {detail}") from None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise errors.CsiError(code, f"storage node {self.node.name} did not answer in time") from None
            raise errors.unavailable(f"storage node {self.node.name} ({self.node.address}) is unreachable: "
                                     f"{code.name if code else '?'} {detail}") from None

    def info(self, timeout: float | None = None) -> pb.AgentInfo:
        return self.call("GetInfo", pb.GetInfoRequest(), timeout)


class Agents:
    def __init__(self, config: ControllerConfig):
        self.config = config
        creds = TlsFiles(config.tls_dir).channel_credentials()
        options = [("grpc.ssl_target_name_override", config.agent_server_name),
                   ("grpc.default_authority", config.agent_server_name)]
        self._clients = {n.name: AgentClient(n, grpc.secure_channel(n.address, creds, options=options))
                         for n in config.storage_nodes}
        self._pool = futures.ThreadPoolExecutor(max_workers=max(4, len(self._clients)))

    def get(self, node_name: str) -> AgentClient:
        client = self._clients.get(node_name)
        if client is None:
            raise errors.not_found(f"storage node {node_name!r} is not in this controller's configuration")
        return client

    def all(self) -> list[AgentClient]:
        return [self._clients[n] for n in sorted(self._clients)]

    def each(self, fn: Callable[[AgentClient], T]) -> dict[str, T | errors.CsiError]:
        """Runs fn against every agent at once; the value or the CsiError per node name."""
        jobs = {c.node.name: self._pool.submit(_capture, fn, c, runner.time_left()) for c in self.all()}
        return {name: job.result() for name, job in jobs.items()}


def _capture(fn, client, seconds):
    with runner.deadline(seconds):
        try:
            return fn(client)
        except errors.CsiError as exc:
            return exc
