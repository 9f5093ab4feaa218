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
