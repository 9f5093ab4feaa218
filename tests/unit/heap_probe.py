"""Run by test_heap.py in a process of its own (mallopt is per process): the minor page faults of this process
while it streams MIB MiB to itself as 1 MiB DataChunks over mutual TLS gRPC, as the agents' copies do.

    python -m tests.unit.heap_probe <pki dir> keep|default
"""

from __future__ import annotations

import resource
import sys
from concurrent import futures
from pathlib import Path

import grpc

from csi import heap, peers
from csi.proto import agent_pb2 as pb
from csi.server import TlsFiles
from csi.tls import TestPki

STREAMS, CHUNKS = 10, 64
MIB = STREAMS * CHUNKS
DATA = bytes(range(256)) * 4096


def stream(request, context):
    for i in range(CHUNKS):
        yield pb.DataChunk(offset=i << 20, data=DATA)


def main(pki_dir: str, mode: str) -> int:
    pki = TestPki(Path(pki_dir))
    server_files, client_files = TlsFiles(pki.ensure("agent", "a")), TlsFiles(pki.ensure("agent", "b"))
    if mode == "keep" and not heap.keep_freed_memory():
        return 2
    srv = grpc.server(futures.ThreadPoolExecutor(2))
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("probe.S", {
        "Read": grpc.unary_stream_rpc_method_handler(stream, request_deserializer=pb.ReadDataRequest.FromString,
                                                     response_serializer=pb.DataChunk.SerializeToString)}),))
    port = srv.add_secure_port("127.0.0.1:0", server_files.server_credentials())
    srv.start()
    ca, cert, key = client_files.read()
    channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca, key, cert), options=[
        ("grpc.ssl_target_name_override", peers.dns_name(peers.AGENT, "a")),
        ("grpc.max_receive_message_length", 8 << 20)])
    read = channel.unary_stream("/probe.S/Read", request_serializer=pb.ReadDataRequest.SerializeToString,
                                response_deserializer=pb.DataChunk.FromString)
    for _ in range(2):                     # warm-up: the arenas and thread stacks of both ends
        for _ in read(pb.ReadDataRequest()):
            pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(STREAMS):
        for _ in read(pb.ReadDataRequest()):
            pass
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    channel.close()
    srv.stop(None)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
