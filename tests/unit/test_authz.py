"""Who may call what on an agent (issue 13), over real mutual-TLS gRPC with one certificate per identity:
the controller everything; another agent only ReadData of what the controller allowed it; a node plugin only
the credentials of grants made for its own node; anything else PERMISSION_DENIED, with no side effect."""

from __future__ import annotations

import contextlib
import json

import grpc
import pytest

from csi import capabilities as caps
from csi import ids, peers, server
from csi.config import AgentConfig
from csi.proto import agent_pb2 as apb
from csi.proto import agent_pb2_grpc
from csi.storage.lio import Portal
from csi.storage.lvm import Lvm
from csi.storage.records import RecordStore
from csi.storage.service import AgentService
from csi.tls import TestPki
from tests.unit.test_hostile import ATTRIBUTES, BLOCK_ATTRIBUTES, CLUSTER, POOLS, WORKER, WORKER2, FakeLio, LvmSim, \
    node_responses

MiB = 1 << 20


@contextlib.contextmanager
def served_agent(fake_run, tmp_path, **server_args):
    """storage-1's agent (simulated LVM and LIO, real records) served over mutual TLS with its own certificate
    and its authorizer (plus server_args for make_server): (agent, sim, pki, client), client(tls_dir) making a
    stub that presents the certificate in tls_dir. Also the metrics tests' agent."""
    sim = LvmSim()
    fake_run.responses = node_responses(sim)
    pki = TestPki(tmp_path / "pki")
    state = tmp_path / "state"
    agent = AgentService(AgentConfig("storage-1", "unused", (Portal("10.0.0.1"),), state, CLUSTER,
                                     pki.ensure("agent", "storage-1"), POOLS, ("/dev/sdb",)),
                         Lvm(state / "lvm-system"), FakeLio(), RecordStore(state / "volumes"), sim.device_node_exists)
    srv = server.make_server(max_workers=4, authorize=agent.authorizer, **server_args)
    agent_pb2_grpc.add_AgentServicer_to_server(agent, srv)
    port = srv.add_secure_port("127.0.0.1:0", server.TlsFiles(pki.ensure("agent", "storage-1")).server_credentials())
    srv.start()
    channels = []

    def client(tls_dir):
        ch = grpc.secure_channel(f"127.0.0.1:{port}", server.TlsFiles(tls_dir).channel_credentials(),
                                 options=[("grpc.ssl_target_name_override",
                                           peers.dns_name(peers.AGENT, "storage-1"))])
        channels.append(ch)
        return agent_pb2_grpc.AgentStub(ch)

    try:
        yield agent, sim, pki, client
    finally:
        for ch in channels:
            ch.close()
        srv.stop(None)


@pytest.fixture
def world(fake_run, tmp_path):
    """The served agent and a client per identity."""
    with served_agent(fake_run, tmp_path) as (agent, _, pki, client):
        stubs = {"client": client, "controller": client(pki.ensure("controller")),
                 "storage-2": client(pki.ensure("agent", "storage-2")),
                 "storage-1": client(pki.ensure("agent", "storage-1")),
                 "worker-1": client(pki.ensure("node", "worker-1")),
                 "worker-2": client(pki.ensure("node", "worker-2"))}
        yield agent, stubs, pki


def denied(call, *args) -> bool:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=10)
    return e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def state_of(agent) -> str:
    return json.dumps([r.to_json() for r in agent.records.all()]) + json.dumps(agent.lio.targets, default=str)


def test_another_storage_node_reaches_nothing_but_an_allowed_copy(world):
    agent, stubs, _ = world
    ctl, intruder = stubs["controller"], stubs["storage-2"]
    vol = ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-1", pool="thin", size_bytes=64 * MiB,
                                                   attributes=ATTRIBUTES), timeout=10)
    before = state_of(agent)
    where = dict(vg=vol.vg, lv=vol.lv)
    for method, request in (("DeleteVolume", apb.DeleteVolumeRequest(**where)),
                            ("GrantAccess", apb.GrantAccessRequest(**where, initiator_iqn=WORKER2,
                                                                   node_name="storage-2")),
                            ("ExpandVolume", apb.ExpandVolumeRequest(**where, size_bytes=128 * MiB)),
                            ("GetCredentials", apb.GetCredentialsRequest(**where, initiator_iqn=WORKER)),
                            ("AllowCopy", apb.AllowCopyRequest(**where, destination_node="storage-2",
                                                               ttl_seconds=60)),
                            ("GetInfo", apb.GetInfoRequest()), ("Orphans", apb.OrphansRequest(remove=True))):
        assert denied(getattr(intruder, method), request), method
    with pytest.raises(grpc.RpcError) as e:
        next(intruder.ReadData(apb.ReadDataRequest(**where), timeout=10))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert state_of(agent) == before                          # nothing changed
    # The controller allows storage-2 to copy this one volume: now it may read it, and only it.
    ctl.AllowCopy(apb.AllowCopyRequest(**where, destination_node="storage-2", ttl_seconds=60), timeout=10)
    with pytest.raises(grpc.RpcError) as e:       # the simulated LVM has no device to read: past authorization
        next(intruder.ReadData(apb.ReadDataRequest(**where), timeout=10))
    assert e.value.code() == grpc.StatusCode.INTERNAL and "No such file" in e.value.details()
    other = ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-2", pool="thin", size_bytes=64 * MiB,
                                                     attributes=ATTRIBUTES), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        next(intruder.ReadData(apb.ReadDataRequest(vg=other.vg, lv=other.lv), timeout=10))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # nothing copies a volume from a node to that same node through ReadData
    with pytest.raises(grpc.RpcError) as e:
        ctl.AllowCopy(apb.AllowCopyRequest(**where, destination_node="storage-1", ttl_seconds=60), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_node_plugin_gets_only_its_own_nodes_credentials(world):
    agent, stubs, _ = world
    ctl = stubs["controller"]
    vol = ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-3", pool="thin", size_bytes=64 * MiB,
                                                   attributes=ATTRIBUTES), timeout=10)
    grant = ctl.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER, node_name="worker-1"),
                            timeout=10)
    assert not [f for f, _ in grant.ListFields() if "chap" in f.name]     # the controller gets no secret
    req = apb.GetCredentialsRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER)
    mine = stubs["worker-1"].GetCredentials(req, timeout=10)
    record = agent.records.load(vol.vg, vol.lv).grants[WORKER]
    assert (mine.chap_user, mine.chap_secret) == (record.chap_user, record.chap_secret)
    assert denied(stubs["worker-2"].GetCredentials, req)                 # worker-1's grant, asked by worker-2
    assert denied(stubs["worker-1"].GrantAccess, apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER2,
                                                                        node_name="worker-1"))
    assert denied(stubs["worker-1"].DeleteVolume, apb.DeleteVolumeRequest(vg=vol.vg, lv=vol.lv))
    assert agent.records.load(vol.vg, vol.lv).grants.keys() == {WORKER}


def test_an_agent_refuses_a_second_node_of_a_single_node_volume(world):
    """Two controllers (HA, a stale leader) cannot double-attach: the agent holds the single-writer rule."""
    _, stubs, _ = world
    ctl = stubs["controller"]
    vol = ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-4", pool="thin", size_bytes=64 * MiB,
                                                   attributes=ATTRIBUTES), timeout=10)
    ctl.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER, node_name="worker-1"),
                    timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        ctl.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER2, node_name="worker-2"),
                        timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    ctl.RevokeAccess(apb.RevokeAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER), timeout=10)
    ctl.GrantAccess(apb.GrantAccessRequest(vg=vol.vg, lv=vol.lv, initiator_iqn=WORKER2, node_name="worker-2"),
                    timeout=10)
    # several writers on raw block: two grants are fine
    blk = ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-5", pool="thin", size_bytes=64 * MiB,
                                                   attributes=BLOCK_ATTRIBUTES), timeout=10)
    for who, node in ((WORKER, "worker-1"), (WORKER2, "worker-2")):
        ctl.GrantAccess(apb.GrantAccessRequest(vg=blk.vg, lv=blk.lv, initiator_iqn=who, node_name=node), timeout=10)


def test_a_caller_without_a_role_name_is_nobody(world, tmp_path):
    """A certificate of the right CA that names no role (the shared agent certificate of earlier versions):
    it passes TLS, and may do nothing."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    from csi import pki as issuing
    from csi.fsutil import write_atomic
    agent, stubs, test_pki = world
    key = issuing.new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    legacy = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(test_pki.ca.subject)
              .public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("lvm-iscsi-agent")]), critical=False)
              .sign(test_pki.ca_key, hashes.SHA256()))
    d = tmp_path / "legacy"
    write_atomic(d / "ca.crt", issuing.cert_pem(test_pki.ca))
    write_atomic(d / "tls.key", issuing.key_pem(key))
    write_atomic(d / "tls.crt", issuing.cert_pem(legacy))
    nobody = stubs["client"](d)
    assert denied(nobody.GetInfo, apb.GetInfoRequest())
    assert denied(nobody.CreateVolume, apb.CreateVolumeRequest(name="x", pool="thin", size_bytes=MiB,
                                                               attributes=ATTRIBUTES))
    assert not list(agent.records.all())


# ---------------------------------------------------------------------------------------------- secrets already out

def _old_record(agent, vol) -> None:
    """Rewrites the volume's record as the driver before node-bound grants wrote it (version 1): its grants'
    secrets went to the controller and into publish_context, so they may be in VolumeAttachments."""
    path = agent.records.path(vol.vg, vol.lv)
    data = json.loads(path.read_text())
    data["version"] = 1
    for g in data["grants"].values():
        g.pop("node"), g.pop("exposed")
    path.write_text(json.dumps(data))


def test_secrets_of_an_older_version_are_rotated_once_no_session_uses_them(world):
    from csi.storage import access
    agent, stubs, _ = world
    ctl = stubs["controller"]
    vols = [ctl.CreateVolume(apb.CreateVolumeRequest(name=n, pool="thin", size_bytes=64 * MiB,
                                                     attributes=ATTRIBUTES), timeout=10) for n in ("idle", "busy")]
    for v in vols:
        ctl.GrantAccess(apb.GrantAccessRequest(vg=v.vg, lv=v.lv, initiator_iqn=WORKER, node_name="worker-1"),
                        timeout=10)
        _old_record(agent, v)
    idle, busy = vols
    old = {v.lv: agent.records.load(v.vg, v.lv).grants[WORKER].chap_secret for v in vols}
    assert all(agent.records.load(v.vg, v.lv).grants[WORKER].exposed for v in vols)
    agent.lio.logged_in.add((busy.target_iqn, WORKER))     # a session to busy is live, none to idle
    counts = access.rotate_exposed(agent)
    rotated = agent.records.load(idle.vg, idle.lv).grants[WORKER]
    kept = agent.records.load(busy.vg, busy.lv).grants[WORKER]
    assert counts == {"rotated": 1, "in_use": 1}
    assert rotated.chap_secret != old[idle.lv] and not rotated.exposed
    assert agent.lio.targets[idle.target_iqn]["acls"][WORKER].chap_secret == rotated.chap_secret
    assert kept.chap_secret == old[busy.lv] and kept.exposed      # a live session keeps logging in again


def test_a_node_about_to_log_in_gets_fresh_secrets_for_an_exposed_grant(world):
    agent, stubs, _ = world
    ctl = stubs["controller"]
    v = ctl.CreateVolume(apb.CreateVolumeRequest(name="later", pool="thin", size_bytes=64 * MiB,
                                                 attributes=ATTRIBUTES), timeout=10)
    grant = apb.GrantAccessRequest(vg=v.vg, lv=v.lv, initiator_iqn=WORKER, node_name="worker-1")
    ctl.GrantAccess(grant, timeout=10)
    _old_record(agent, v)
    old = agent.records.load(v.vg, v.lv).grants[WORKER].chap_secret
    # An older version's grant names no node: refused to every node plugin until a publish names it.
    assert denied(stubs["worker-1"].GetCredentials, apb.GetCredentialsRequest(vg=v.vg, lv=v.lv,
                                                                              initiator_iqn=WORKER))
    # The new controller publishes it again (its session still live): bound, secret kept, still exposed.
    agent.lio.logged_in.add((v.target_iqn, WORKER))
    ctl.GrantAccess(grant, timeout=10)
    kept = agent.records.load(v.vg, v.lv).grants[WORKER]
    assert (kept.node, kept.chap_secret, kept.exposed) == ("worker-1", old, True)
    # The session ends (unstage); at the next stage the node plugin gets secrets nobody saw before.
    agent.lio.logged_in.clear()
    got = stubs["worker-1"].GetCredentials(apb.GetCredentialsRequest(vg=v.vg, lv=v.lv, initiator_iqn=WORKER),
                                           timeout=10)
    assert got.chap_secret != old and agent.lio.targets[v.target_iqn]["acls"][WORKER].chap_secret == got.chap_secret
    assert not agent.records.load(v.vg, v.lv).grants[WORKER].exposed
    again = stubs["worker-1"].GetCredentials(apb.GetCredentialsRequest(vg=v.vg, lv=v.lv, initiator_iqn=WORKER),
                                             timeout=10)
    assert again.chap_secret == got.chap_secret


def test_a_record_of_a_newer_version_is_left_alone(world):
    agent, stubs, _ = world
    v = stubs["controller"].CreateVolume(apb.CreateVolumeRequest(name="future", pool="thin", size_bytes=64 * MiB,
                                                                 attributes=ATTRIBUTES), timeout=10)
    path = agent.records.path(v.vg, v.lv)
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    assert list(agent.records.all()) == []            # not read, not rewritten, not deleted
    assert json.loads(path.read_text())["version"] == 99


def test_where_a_replaced_leg_is_goes_only_to_a_node_the_leg_is_granted_to(world):
    """SetPeerLeg is the controller's; GetPeerLeg answers the node plugin of a node the leg is granted to (the
    worker running the volume) and nobody else; the answer is checked as publish_context is, and it goes with
    the volume."""
    agent, stubs, _ = world
    ctl = stubs["controller"]
    leg = dict(ATTRIBUTES, **{caps.ATTR_REPLICAS: "2", caps.ATTR_LEG: "0"})
    vol = ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-r", pool="thin", size_bytes=64 * MiB, attributes=leg),
                           timeout=10)
    where = dict(vg=vol.vg, lv=vol.lv)
    ctl.GrantAccess(apb.GrantAccessRequest(**where, initiator_iqn=WORKER, node_name="worker-1"), timeout=10)
    assert stubs["worker-1"].GetPeerLeg(apb.GetPeerLegRequest(**where), timeout=10) == apb.PeerLeg(present=False)
    peer = apb.LegLocation(index=1, storage_node="storage-3", vg="csi-vg", agent="10.0.0.3:7600",
                           target_iqn=ids.target_iqn("csi-vg", vol.lv), portals=["10.0.0.3:3260"], lun=0)
    assert denied(stubs["worker-1"].SetPeerLeg, apb.SetPeerLegRequest(**where, peer=peer))
    ctl.SetPeerLeg(apb.SetPeerLegRequest(**where, peer=peer), timeout=10)
    assert stubs["worker-1"].GetPeerLeg(apb.GetPeerLegRequest(**where), timeout=10) == apb.PeerLeg(present=True,
                                                                                                    peer=peer)
    for other in ("worker-2", "storage-2"):
        assert denied(stubs[other].GetPeerLeg, apb.GetPeerLegRequest(**where)), other
    for bad in (dict(target_iqn=ids.target_iqn("csi-vg", "c1-other")), dict(storage_node="storage-1"),
                dict(index=2), dict(portals=["storage-3"]), dict(agent="")):
        wrong = apb.LegLocation()
        wrong.CopyFrom(peer)
        for k, v in bad.items():
            if k == "portals":
                del wrong.portals[:]
                wrong.portals.extend(v)
            else:
                setattr(wrong, k, v)
        with pytest.raises(grpc.RpcError) as e:
            ctl.SetPeerLeg(apb.SetPeerLegRequest(**where, peer=wrong), timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, bad
    plain = ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-p", pool="thin", size_bytes=64 * MiB,
                                                     attributes=ATTRIBUTES), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        ctl.SetPeerLeg(apb.SetPeerLegRequest(vg=plain.vg, lv=plain.lv, peer=peer), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ctl.DeleteVolume(apb.DeleteVolumeRequest(**where), timeout=10)
    assert agent.peer_legs.load(vol.vg, vol.lv) is None
