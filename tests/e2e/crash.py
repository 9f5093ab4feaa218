"""Kill a process of the driver at a named step (csi/faults.py), restart it without the fault, and retry the
call as the sidecars would: the crash campaign's moves, shared by tests/e2e/test_crash*.py. TRIED lists every
kill point a test reached, for the campaign's coverage checks."""

from __future__ import annotations

import grpc
import pytest

from csi import faults
from csi.proto import csi_pb2 as csi

ENV = faults.ENV
TRIED: list[str] = []


def crash_agent_during(cluster, step: str, call, node=None):
    node = node or cluster.s1
    cluster.d.start_agent(node, env={ENV: step})
    with pytest.raises(grpc.RpcError):
        call()
    assert node.wait_exit("agent", timeout=60) == -9, f"the agent did not die at {step}"
    cluster.d.start_agent(node)
    TRIED.append(f"agent:{step}")
    return call()


def crash_node_during(cluster, step: str, call):
    cluster.d.start_node_plugin(cluster.w, env={ENV: step})
    with pytest.raises(grpc.RpcError):
        call()
    assert cluster.w.wait_exit("node-plugin", timeout=60) == -9, f"the node plugin did not die at {step}"
    cluster.d.start_node_plugin(cluster.w)
    TRIED.append(f"node:{step}")
    return call()


def crash_controller_during(cluster, step: str, call):
    storage = [cluster.s1, cluster.s2, cluster.s3]
    try:
        cluster.d.start_controller(storage, env={ENV: step})
        with pytest.raises(grpc.RpcError):
            call()
        assert cluster.d.controller.wait(60) == -9, f"the controller did not die at {step}"
    finally:
        cluster.d.start_controller(storage)
    TRIED.append(f"controller:{step}")
    return call(wait_for_ready=True)


def crash_node_in_unstage(cluster, vid: str, ctx: dict, step: str) -> None:
    """Stages and publishes the volume on the worker, unpublishes it, then kills the node plugin at `step` of
    its NodeUnstageVolume and retries that."""
    staging, target = cluster.paths(vid)
    cluster.stage_publish(vid, ctx)
    cluster.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target)),
                                     timeout=60)
    req = csi.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging))
    crash_node_during(cluster, step, lambda: cluster.node.NodeUnstageVolume(req, timeout=120))
