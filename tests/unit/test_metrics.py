"""Metrics (csi/metrics.py): real gRPC calls through a real server with the one interceptor, scraped from
prometheus_client's real HTTP endpoint; the counters and histograms move by exactly the calls made, and the
agent's and node plugin's gauges say what their state holds."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from csi import cli, metrics, server
from csi.config import ConfigError, NodeConfig
from csi.identity import IdentityService
from csi.node.service import NodeService
from csi.proto import agent_pb2 as apb
from csi.proto import csi_pb2, csi_pb2_grpc
from tests.unit.test_authz import served_agent
from tests.unit.test_hostile import ATTRIBUTES, WORKER, LvmSim, node_responses

MiB = 1 << 20
GiB = 1 << 30
AGENT_SERVICE = "lvmiscsi.agent.v1.Agent"


class Scraper:
    """prometheus_client's own HTTP server on 127.0.0.1:0, scraped over a real connection."""

    def __init__(self, registry: CollectorRegistry):
        self.server, self.thread = metrics.serve("127.0.0.1:0", registry)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"

    def samples(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(self.url, timeout=10) as r:
            assert r.status == 200
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def rpc(service: str, method: str, code: str) -> dict:
    return {"grpc_service": service, "grpc_method": method, "grpc_code": code}


@pytest.fixture
def agent_world(fake_run, tmp_path):
    """A real agent (simulated LVM and LIO, real records) behind a real mutual-TLS gRPC server with the
    interceptor counting into a registry of the test's, with the agent's collector; its metrics endpoint."""
    registry = CollectorRegistry()
    with served_agent(fake_run, tmp_path, metrics=metrics.RpcMetrics(registry)) as (agent, sim, pki, client):
        registry.register(metrics.AgentCollector(agent))
        scraper = Scraper(registry)
        yield agent, sim, client(pki.ensure("controller")), client(pki.ensure("agent", "storage-2")), scraper
        scraper.close()


def test_agent_rpcs_are_counted_and_timed_by_method_and_code(agent_world):
    _, _, ctl, intruder, scraper = agent_world
    before = scraper.samples()
    req = apb.CreateVolumeRequest(name="pvc-1", pool="thin", size_bytes=64 * MiB, attributes=ATTRIBUTES)
    ctl.CreateVolume(req, timeout=10)
    ctl.CreateVolume(req, timeout=10)                                  # idempotent: OK again
    with pytest.raises(grpc.RpcError) as e:                            # another size: ALREADY_EXISTS
        ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-1", pool="thin", size_bytes=GiB * 4,
                                                 attributes=ATTRIBUTES), timeout=10)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as e:                        # another storage node: refused
            intruder.GetInfo(apb.GetInfoRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:                            # a stream, refused too
        next(intruder.ReadData(apb.ReadDataRequest(vg="vg", lv="x"), timeout=10))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    after = scraper.samples()

    expected = {("CreateVolume", "OK"): 2, ("CreateVolume", "ALREADY_EXISTS"): 1,
                ("GetInfo", "PERMISSION_DENIED"): 3, ("ReadData", "PERMISSION_DENIED"): 1}
    handled = "lvm_iscsi_csi_grpc_server_handled_total"
    changed = {(dict(k[1])["grpc_method"], dict(k[1])["grpc_code"]): v - before.get(k, 0.0)
               for k, v in after.items() if k[0] == handled and v != before.get(k, 0.0)}
    assert changed == expected
    hist = "lvm_iscsi_csi_grpc_server_handling_seconds"
    for (method, code), n in expected.items():
        labels = rpc(AGENT_SERVICE, method, code)
        assert delta(before, after, hist + "_count", **labels) == n
        assert delta(before, after, hist + "_sum", **labels) > 0
        buckets = [value(after, hist + "_bucket", **labels, le=b) for b in
                   [str(x) for x in metrics.RPC_BUCKETS] + ["+Inf"]]
        assert buckets == sorted(buckets) and buckets[-1] == n        # cumulative, every call in +Inf
    # A created volume shows up in the agent's own gauges at the next scrape.
    assert value(after, "lvm_iscsi_csi_pool_volumes", pool="thin", vg="vg", thin_pool="tp") == 1
    assert value(after, "lvm_iscsi_csi_exports", pool="thin") == 1


def test_agent_gauges_say_what_its_pools_records_and_wipes_hold(agent_world):
    agent, sim, ctl, _, scraper = agent_world
    thin = ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-a", pool="thin", size_bytes=64 * MiB,
                                                    attributes=ATTRIBUTES), timeout=10)
    ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-b", pool="thin", size_bytes=64 * MiB,
                                             attributes=ATTRIBUTES), timeout=10)
    thick = ctl.CreateVolume(apb.CreateVolumeRequest(name="pvc-c", pool="thick", size_bytes=256 * MiB,
                                                     attributes=ATTRIBUTES), timeout=10)
    ctl.GrantAccess(apb.GrantAccessRequest(vg=thin.vg, lv=thin.lv, initiator_iqn=WORKER, node_name="worker-1"),
                    timeout=10)
    # A deleted thick volume is zeroed before its space is freed (the wiper's thread is not started here:
    # the wipe stays in the backlog).
    ctl.DeleteVolume(apb.DeleteVolumeRequest(vg=thick.vg, lv=thick.lv), timeout=10)
    s = scraper.samples()

    tp = dict(pool="thin", vg="vg", thin_pool="tp")
    vg = dict(pool="thick", vg="vg", thin_pool="")
    assert value(s, "lvm_iscsi_csi_pool_up", **tp) == value(s, "lvm_iscsi_csi_pool_up", **vg) == 1
    # The simulated thin pool: 20 GiB, 5% data, 2% metadata (as its lvs report and dmsetup status say).
    assert value(s, "lvm_iscsi_csi_pool_size_bytes", **tp) == 20 * GiB
    assert value(s, "lvm_iscsi_csi_pool_data_fill_ratio", **tp) == pytest.approx(0.05, abs=1e-3)
    assert value(s, "lvm_iscsi_csi_pool_metadata_fill_ratio", **tp) == pytest.approx(0.02, abs=1e-3)
    assert value(s, "lvm_iscsi_csi_pool_used_bytes", **tp) == pytest.approx(GiB, rel=1e-3)
    assert value(s, "lvm_iscsi_csi_pool_overprovision_ratio", **tp) == 2.0
    assert value(s, "lvm_iscsi_csi_pool_warn_fill_ratio", **tp) == 0.8
    assert value(s, "lvm_iscsi_csi_pool_max_fill_ratio", **tp) == 0.9
    assert value(s, "lvm_iscsi_csi_pool_volumes", **tp) == 2
    # 2 x 64 MiB thin volumes of 40 GiB (2.0 x 20 GiB) overprovisioned
    assert value(s, "lvm_iscsi_csi_pool_available_bytes", **tp) == 40 * GiB - 128 * MiB
    # The thick pool is the VG: 100 GiB, of which the thin pool, a foreign LV and the LV being wiped use some.
    assert value(s, "lvm_iscsi_csi_pool_size_bytes", **vg) == LvmSim.VG_SIZE
    assert value(s, "lvm_iscsi_csi_pool_used_bytes", **vg) == 20 * GiB + GiB + 256 * MiB
    assert value(s, "lvm_iscsi_csi_pool_volumes", **vg) == 0
    assert value(s, "lvm_iscsi_csi_exports", pool="thin") == 2
    assert value(s, "lvm_iscsi_csi_exports", pool="thick") == 0
    assert value(s, "lvm_iscsi_csi_acls", pool="thin") == 1
    assert value(s, "lvm_iscsi_csi_wipe_backlog_volumes", vg="vg") == 1
    assert value(s, "lvm_iscsi_csi_wipe_backlog_bytes", vg="vg") == 256 * MiB
    assert value(s, "lvm_iscsi_csi_wipe_failing", vg="vg") == 0
    assert value(s, "lvm_iscsi_csi_copies_in_flight") == 0
    assert value(s, "lvm_iscsi_csi_scrape_errors") == 0


def test_a_pool_missing_on_the_node_is_reported_down_not_an_error(agent_world):
    agent, sim, _, _, scraper = agent_world
    del sim.lvs[("vg", "tp")]
    s = scraper.samples()
    assert value(s, "lvm_iscsi_csi_pool_up", pool="thin", vg="vg", thin_pool="tp") == 0
    assert ("lvm_iscsi_csi_pool_size_bytes", tuple(sorted(dict(pool="thin", vg="vg", thin_pool="tp").items()))) \
        not in s
    assert value(s, "lvm_iscsi_csi_pool_up", pool="thick", vg="vg", thin_pool="") == 1
    assert value(s, "lvm_iscsi_csi_scrape_errors") == 0


def test_a_scrape_costs_no_lvm_listing_while_the_reports_are_fresh(agent_world, fake_run):
    _, _, ctl, _, scraper = agent_world
    ctl.GetInfo(apb.GetInfoRequest(), timeout=10)        # the reports GetInfo reads, now cached
    ran = len(fake_run.calls)
    scraper.samples()
    scraper.samples()
    assert [c for c in fake_run.calls[ran:] if c[0] in ("lvs", "vgs")] == []


@pytest.fixture
def node_world(fake_run, tmp_path):
    """A real node plugin (Identity + Node) behind a real server with the interceptor, and its collector."""
    fake_run.responses = node_responses(LvmSim())
    (tmp_path / "initiatorname.iscsi").write_text(f"InitiatorName={WORKER}\n")
    config = NodeConfig.build(driver_name="lvm-iscsi.csi.dev", node_name="worker-1",
                              kubelet_dir=str(tmp_path / "kubelet"),
                              initiator_name_file=str(tmp_path / "initiatorname.iscsi"), zone="zone-a",
                              max_volumes=8, state_dir=str(tmp_path / "staged"), tls_dir="")
    config.state_dir.mkdir(parents=True)
    node = NodeService(config, zone="zone-a")
    registry = CollectorRegistry()
    registry.register(metrics.NodeCollector(node))
    srv = server.make_server(max_workers=4, metrics=metrics.RpcMetrics(registry))
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService("lvm-iscsi.csi.dev", lambda: None), srv)
    csi_pb2_grpc.add_NodeServicer_to_server(node, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    scraper = Scraper(registry)
    yield node, csi_pb2_grpc.IdentityStub(ch), csi_pb2_grpc.NodeStub(ch), scraper
    scraper.close()
    ch.close()
    srv.stop(None)


def test_every_servicer_of_a_server_is_counted(node_world):
    _, identity, node, scraper = node_world
    before = scraper.samples()
    identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10)
    identity.Probe(csi_pb2.ProbeRequest(), timeout=10)
    node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
    with pytest.raises(grpc.RpcError) as e:
        node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=""), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = scraper.samples()
    name = "lvm_iscsi_csi_grpc_server_handled_total"
    changed = {tuple(dict(k[1]).values()): v - before.get(k, 0.0)
               for k, v in after.items() if k[0] == name and v != before.get(k, 0.0)}
    assert changed == {("INVALID_ARGUMENT", "NodeUnstageVolume", "csi.v1.Node"): 1,
                       ("OK", "GetPluginInfo", "csi.v1.Identity"): 1, ("OK", "Probe", "csi.v1.Identity"): 1,
                       ("OK", "NodeGetInfo", "csi.v1.Node"): 1}


def test_node_gauges_count_its_stage_records_and_logins(node_world):
    node, _, _, scraper = node_world
    s = scraper.samples()
    assert value(s, "lvm_iscsi_csi_node_staged_volumes") == value(s, "lvm_iscsi_csi_node_iscsi_logins") == 0
    for i in range(3):     # what NodeStageVolume writes before its login
        node._record_path(f"vol-{i}").write_text(json.dumps({"volume_id": f"vol-{i}"}))
        node.ledger.add(f"iqn.2026-11.dev.csi.lvm-iscsi:vg.v{i}")
    (node.config.state_dir / ".tmp-half-written.json").write_text("{")   # write_atomic's temporary file
    s = scraper.samples()
    assert value(s, "lvm_iscsi_csi_node_staged_volumes") == 3
    assert value(s, "lvm_iscsi_csi_node_iscsi_logins") == 3
    node._record_path("vol-0").unlink()
    node.ledger.remove("iqn.2026-11.dev.csi.lvm-iscsi:vg.v0")
    s = scraper.samples()
    assert value(s, "lvm_iscsi_csi_node_staged_volumes") == value(s, "lvm_iscsi_csi_node_iscsi_logins") == 2


class Aborted(Exception):
    pass


class ExpiredContext:
    def time_remaining(self):
        return -1.0

    def abort(self, code, message):
        raise Aborted()


def test_a_call_refused_for_its_passed_deadline_is_counted_as_such():
    registry = CollectorRegistry()
    interceptor = server.CallInterceptor(metrics=metrics.RpcMetrics(registry))

    class Details:
        method = "/csi.v1.Node/NodeStageVolume"

    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: pytest.fail("started"))
    call = interceptor.intercept_service(lambda _: handler, Details()).unary_unary
    with pytest.raises(Aborted):
        call("req", ExpiredContext())
    assert registry.get_sample_value("lvm_iscsi_csi_grpc_server_handled_total",
                                     rpc("csi.v1.Node", "NodeStageVolume", "DEADLINE_EXCEEDED")) == 1


@pytest.mark.parametrize("address, expected", [("127.0.0.1:9820", ("127.0.0.1", 9820)), (":9821", ("0.0.0.0", 9821)),
                                               ("[::1]:9822", ("::1", 9822))])
def test_metrics_address_forms(address, expected):
    assert metrics.parse_address(address) == expected


@pytest.mark.parametrize("address", ["9820", "host:", "host:port", "host:70000"])
def test_a_wrong_metrics_address_stops_the_process_with_a_configuration_error(address):
    a = cli.parser().parse_args(["agent", "--node-name", "s1", "--config", "x", "--tls-dir", "t",
                                 "--metrics-address", address])
    with pytest.raises(ConfigError, match="metrics address"):
        cli._metrics(a)


def test_metrics_are_off_unless_asked():
    for role in (["controller", "--tls-dir", "t"], ["node", "--node-name", "w"],
                 ["agent", "--node-name", "s1", "--config", "x", "--tls-dir", "t"]):
        a = cli.parser().parse_args(role)
        assert a.metrics_address == "" and cli._metrics(a) is None


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
def test_the_agent_is_ready_once_its_start_has_brought_every_volume_back(host):
    """/readyz, kubelet's readiness probe of the agent (the chart's), says 503 with the reason while the start
    still holds volumes, and 200 once it released the last; the metrics stay served on the same port."""
    from csi.storage import restore
    locks = server.KeyLocks()
    progress = restore.Progress(locks)
    progress.total = 2
    locks.reserve(["vg1/a", "vg1/b"], restore.RESTORING)
    registry = CollectorRegistry()
    metrics.RpcMetrics(registry)
    srv, _ = metrics.serve(f"{host}:0", registry, progress.reason)
    base = f"http://{host}:{srv.server_port}"
    try:
        assert get(base + metrics.READY_PATH) == (
            503, "restoring exports after the agent's start: 2 of 2 volumes left\n")
        locks.release("vg1/a")
        assert get(base + metrics.READY_PATH)[1].startswith("restoring exports after the agent's start: 1 of 2")
        locks.release("vg1/b")
        assert get(base + metrics.READY_PATH) == (200, "ok\n")
        status, text = get(base + "/metrics")
        assert status == 200 and "lvm_iscsi_csi_grpc_server_handled_total" in text
    finally:
        srv.shutdown()
        srv.server_close()


def test_a_process_without_a_readiness_condition_is_ready():
    srv, _ = metrics.serve("127.0.0.1:0", CollectorRegistry())
    try:
        assert get(f"http://127.0.0.1:{srv.server_port}{metrics.READY_PATH}") == (200, "ok\n")
    finally:
        srv.shutdown()
        srv.server_close()
