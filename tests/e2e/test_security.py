"""Issue 13 on real parts: one storage node's or one worker's credentials reach nothing that is not theirs, no
CHAP secret on a command line or in publish_context, discovery that answers nobody, and CHAP secrets of an
older version rotated without breaking a volume staged across the rollover."""

from __future__ import annotations

import json
import shutil
import sys

import grpc
import pytest

from csi import ids, peers
from csi.proto import agent_pb2 as apb
from csi.proto import agent_pb2_grpc
from csi.proto import csi_pb2 as csi
from tests.e2e.cluster import BLOCK, MiB

pytestmark = pytest.mark.e2e


def agent_stub(cluster, node, as_dir):
    """storage node `node`'s agent, called with the certificate in as_dir (from the host, through the lab)."""
    files = [(as_dir / n).read_bytes() for n in ("ca.crt", "tls.key", "tls.crt")]
    channel = grpc.secure_channel(f"127.0.0.1:{cluster.lab.expose(node.ip, 7600)}",
                                  grpc.ssl_channel_credentials(*files),
                                  options=[("grpc.ssl_target_name_override", peers.dns_name(peers.AGENT, node.name))])
    return agent_pb2_grpc.AgentStub(channel), channel


def refused(call) -> bool:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def records_of(cluster, node) -> str:
    return "".join(sorted(p.read_text() for p in (cluster.d.agent_state(node) / "volumes").rglob("*.json")))


def test_one_storage_nodes_credentials_reach_nothing_on_another(cluster):
    v = cluster.create("sec-other-agent", zone="zone-a")            # on storage-1
    ref = ids.parse_id(v.volume_id)
    cluster.publish(v.volume_id)
    before = (cluster.storage_state(), records_of(cluster, cluster.s1))
    stub, channel = agent_stub(cluster, cluster.s1, cluster.d.pki.ensure("agent", "storage-2"))
    where = dict(vg=ref.vg, lv=ref.lv)
    try:
        assert refused(lambda: stub.DeleteVolume(apb.DeleteVolumeRequest(**where), timeout=30))
        assert refused(lambda: stub.GrantAccess(apb.GrantAccessRequest(
            **where, initiator_iqn=cluster.s2.initiator_iqn, node_name="storage-2"), timeout=30))
        assert refused(lambda: stub.ExpandVolume(apb.ExpandVolumeRequest(**where, size_bytes=128 * MiB), timeout=30))
        assert refused(lambda: stub.GetCredentials(apb.GetCredentialsRequest(**where, initiator_iqn=cluster.node_id),
                                                   timeout=30))
        assert refused(lambda: next(stub.ReadData(apb.ReadDataRequest(**where), timeout=30)))
        assert refused(lambda: stub.AllowCopy(apb.AllowCopyRequest(**where, destination_node="storage-2",
                                                                   ttl_seconds=600), timeout=30))
    finally:
        channel.close()
    assert (cluster.storage_state(), records_of(cluster, cluster.s1)) == before    # nothing changed
    assert "refused DeleteVolume to the agent of storage-2" in cluster.s1.log_path("agent").read_text()
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id,
                                                                                node_id=cluster.node_id))
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)


def test_a_worker_cannot_obtain_another_workers_credentials(cluster):
    v = cluster.create("sec-other-worker", zone="zone-a")
    ref = ids.parse_id(v.volume_id)
    cluster.publish(v.volume_id)                                      # to worker-1
    req = apb.GetCredentialsRequest(vg=ref.vg, lv=ref.lv, initiator_iqn=cluster.node_id)
    theirs, ch2 = agent_stub(cluster, cluster.s1, cluster.d.pki.ensure("node", "worker-2"))
    mine, ch1 = agent_stub(cluster, cluster.s1, cluster.d.pki.ensure("node", "worker-1"))
    try:
        assert refused(lambda: theirs.GetCredentials(req, timeout=30))
        got = mine.GetCredentials(req, timeout=30)
        assert got.chap_secret == cluster.chap(v.volume_id)["chapSecret"]
        assert refused(lambda: mine.DeleteVolume(apb.DeleteVolumeRequest(vg=ref.vg, lv=ref.lv), timeout=30))
    finally:
        ch1.close()
        ch2.close()
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id,
                                                                                node_id=cluster.node_id))
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)


WRAPPER = """#!{python}
import json, os, sys
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
os.execv({real!r}, [{real!r}] + sys.argv[1:])
"""


def test_no_secret_on_any_command_line_during_a_stage(cluster):
    """Every iscsiadm the node plugin runs goes through a wrapper first on its PATH that logs its arguments
    (a scan of /proc would miss runs that last milliseconds); a mutual-CHAP volume is staged and unstaged."""
    w = cluster.w
    wrap = w.workdir / "argv-wrapper"
    wrap.mkdir(exist_ok=True)
    log = wrap / "iscsiadm.argv"
    log.unlink(missing_ok=True)
    (wrap / "iscsiadm").write_text(WRAPPER.format(python=sys.executable, log=str(log),
                                                  real=shutil.which("iscsiadm")))
    (wrap / "iscsiadm").chmod(0o755)
    path = f"{wrap}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    cluster.d.start_node_plugin(w, env={"PATH": path})
    try:
        cluster.node_ready()
        v = cluster.create("sec-argv", zone="zone-a", params={"mutualChap": "true"})
        ctx = cluster.publish(v.volume_id)
        chap = cluster.chap(v.volume_id)
        secrets = [chap["chapSecret"], chap["mutualChapSecret"]]
        assert not [s for s in secrets if s in json.dumps(ctx)]
        target = cluster.stage_publish(v.volume_id, ctx)
        cluster.write(target, mib=1)
        cluster.teardown(v.volume_id)
        runs = [json.loads(line) for line in log.read_text().splitlines()]
        assert any("--login" in r for r in runs) and any("--logout" in r for r in runs), runs
        assert not [r for r in runs if any(s in a for s in secrets for a in r)], "a CHAP secret in an argv"
    finally:
        cluster.d.start_node_plugin(w)
        cluster.node_ready()


def test_discovery_answers_nobody(cluster):
    s1 = cluster.s1
    v = cluster.create("sec-discovery", zone="zone-a", cap=BLOCK)
    cluster.publish(v.volume_id, cap=BLOCK)
    base = "/sys/kernel/config/target/iscsi"
    assert s1.run(["cat", f"{base}/discovery_auth/enforce_discovery_auth"], timeout=30).stdout.strip() == "1"
    ref = ids.parse_id(v.volume_id)
    assert s1.run(["cat", f"{base}/{ref.iqn}/tpgt_1/attrib/demo_mode_discovery"], timeout=30).stdout.strip() == "0"
    # Even the worker the volume is granted to learns nothing by SendTargets (without the discovery secret).
    found = cluster.w.run(["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", f"{s1.ip}:3260"], timeout=60)
    assert found.rc != 0 and ref.iqn not in found.stdout, (found.rc, found.stdout, found.stderr)
    cluster.w.run(["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", f"{s1.ip}:3260", "-o", "delete"],
                  timeout=30)
    cluster.ctrl.ControllerUnpublishVolume(csi.ControllerUnpublishVolumeRequest(volume_id=v.volume_id,
                                                                                node_id=cluster.node_id))
    cluster.ctrl.DeleteVolume(csi.DeleteVolumeRequest(volume_id=v.volume_id), timeout=120)


def test_secrets_of_an_older_version_are_rotated_without_breaking_a_staged_volume(cluster):
    """A volume staged by the version before node-bound grants: its record says version 1 (its secrets went
    into a VolumeAttachment). The agent restarts (the upgrade): the staged volume keeps working, its secret is
    kept while the session lives; unstaged and staged again, it logs in with a new secret nobody saw."""
    s1 = cluster.s1
    v = cluster.create("sec-rotate", zone="zone-a")
    ref = ids.parse_id(v.volume_id)
    ctx = cluster.publish(v.volume_id)
    target = cluster.stage_publish(v.volume_id, ctx)
    digest = cluster.write(target, mib=2)
    old = cluster.chap(v.volume_id)["chapSecret"]
    record = cluster.d.agent_state(s1) / "volumes" / ref.vg / f"{ref.lv}.json"
    data = json.loads(record.read_text())
    data["version"] = 1
    for g in data["grants"].values():
        g.pop("exposed"), g.pop("node")
    s1.signal("agent", 9)
    s1.wait_exit("agent")
    record.write_text(json.dumps(data))
    cluster.d.start_agent(s1)
    # the next publish (the new controller's) names the node; the session is live: the secret stays
    assert cluster.publish(v.volume_id) == ctx
    assert cluster.chap(v.volume_id)["chapSecret"] == old
    assert json.loads(record.read_text())["grants"][cluster.node_id]["exposed"] is True
    assert cluster.read(target) == digest
    # unstage (the session ends) and stage again: new secret, the same data
    staging, _ = cluster.paths(v.volume_id)
    cluster.node.NodeUnpublishVolume(csi.NodeUnpublishVolumeRequest(volume_id=v.volume_id, target_path=str(target)))
    cluster.node.NodeUnstageVolume(csi.NodeUnstageVolumeRequest(volume_id=v.volume_id,
                                                                staging_target_path=str(staging)), timeout=120)
    target = cluster.stage_publish(v.volume_id, ctx)
    assert cluster.read(target) == digest
    new = json.loads(record.read_text())["grants"][cluster.node_id]
    assert new["chap_secret"] != old and not new["exposed"]
    cluster.teardown(v.volume_id)
