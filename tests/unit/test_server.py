"""The one interceptor: a call whose deadline passed while it waited for a worker thread is not started."""

import grpc
import pytest

from csi.server import CallInterceptor


class Aborted(Exception):
    pass


class Context:
    def __init__(self, left):
        self.left = left
        self.status = None

    def time_remaining(self):
        return self.left

    def abort(self, code, message):
        self.status = (code, message)
        raise Aborted()


class Details:
    method = "/csi.v1.Node/NodeStageVolume"


def wrapped(fn):
    handler = grpc.unary_unary_rpc_method_handler(fn)
    return CallInterceptor().intercept_service(lambda _: handler, Details()).unary_unary


def test_a_call_whose_deadline_passed_in_the_queue_is_not_started():
    # Seen with 100 stages at once (tests/e2e/test_load.py): calls that waited out their deadline behind the
    # 16 worker threads still ran, every command with the runner's 2 s floor, and killed iscsiadm mid-write.
    ran = []
    ctx = Context(-0.5)
    with pytest.raises(Aborted):
        wrapped(lambda req, c: ran.append(req))("req", ctx)
    assert ran == [] and ctx.status[0] == grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("left", [None, 30.0])
def test_a_call_with_time_left_or_no_deadline_runs(left):
    ctx = Context(left)
    assert wrapped(lambda req, c: req + "!")("req", ctx) == "req!" and ctx.status is None


@pytest.mark.parametrize("workers", ["CONTROLLER_WORKERS", "AGENT_WORKERS"])
def test_a_quick_call_is_served_while_a_hundred_slow_ones_run(workers, tmp_path):
    """The provisioner runs 100 workers: with 100 CreateVolume calls in flight, a publish (here GetPluginInfo
    beside 100 blocked Probe calls) is served at once, not queued behind them (p95 52 s in the load test with
    16 threads)."""
    import threading
    import time

    from csi import server
    from csi.proto import csi_pb2 as csi
    from csi.proto import csi_pb2_grpc

    release = threading.Event()

    class Slow(csi_pb2_grpc.IdentityServicer):
        def Probe(self, request, context):
            release.wait(30)
            return csi.ProbeResponse()

        def GetPluginInfo(self, request, context):
            return csi.GetPluginInfoResponse(name="x", vendor_version="1")

    srv = server.make_server(getattr(server, workers))
    csi_pb2_grpc.add_IdentityServicer_to_server(Slow(), srv)
    endpoint = f"unix://{tmp_path}/s.sock"
    server.serve(srv, endpoint)
    try:
        with grpc.insecure_channel(server.listen_address(endpoint)) as channel:
            stub = csi_pb2_grpc.IdentityStub(channel)
            slow = [stub.Probe.future(csi.ProbeRequest(), timeout=60) for _ in range(100)]
            time.sleep(1)
            started = time.monotonic()
            assert stub.GetPluginInfo(csi.GetPluginInfoRequest(), timeout=10).name == "x"
            assert time.monotonic() - started < 5
            assert not any(f.done() for f in slow)
            release.set()
            for f in slow:
                f.result(timeout=30)
    finally:
        release.set()
        srv.stop(0)
