"""The chart's metrics objects (metrics.*): each driver process serves its metrics on the port its Service names,
the optional ServiceMonitor selects exactly those Services, and the PrometheusRule's alerts read metrics the
driver really exports (a real agent's scrape) under the job names the ServiceMonitor gives them."""

from __future__ import annotations

import re

import grpc
import promql_parser
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from csi import metrics
from tests.unit.test_chart import NAMESPACE, containers, objects, one, rendered, template
from tests.unit.test_metrics import agent_world  # noqa: F401 - the fixture: a real agent behind a real server

COMPONENTS = {"controller": ("Deployment", "driver", 9820), "node": ("DaemonSet", "driver", 9821),
              "agent": ("DaemonSet", "agent", 9822)}
MONITORING = ("--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true")


def _workload(objs, component):
    kind, container, _ = COMPONENTS[component]
    w = one(objs, kind, f"-{component}")
    return w, containers(w)[container]


def test_every_driver_process_serves_metrics_on_the_port_its_headless_service_names():
    objs = rendered()
    for component, (_, _, port) in COMPONENTS.items():
        workload, c = _workload(objs, component)
        assert f"--metrics-address=:{port}" in c["args"], component
        assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in c["ports"], component
        svc = one(objs, "Service", f"-{component}-metrics")
        assert svc["spec"]["clusterIP"] == "None"          # every pod scraped, not one behind a virtual IP
        assert svc["spec"]["ports"] == [{"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"}]
        # The Service selects exactly this component's pods.
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        others = [_workload(objs, o)[0]["spec"]["template"]["metadata"]["labels"] for o in COMPONENTS if o != component]
        assert not any(svc["spec"]["selector"].items() <= o.items() for o in others)
    assert not [o for o in objs if o["kind"] in ("ServiceMonitor", "PrometheusRule")]   # opt-in: need the CRDs
    # The controller's NetworkPolicy lets the scrape in.
    policy = one(objs, "NetworkPolicy")
    assert 9820 in [p["port"] for p in policy["spec"]["ingress"][0]["ports"]]


def test_metrics_off_means_no_flag_port_or_service():
    objs = objects(template("--set", "metrics.enabled=false").stdout)
    for component in COMPONENTS:
        _, c = _workload(objs, component)
        assert not [a for a in c["args"] if a.startswith("--metrics-address")]
        assert "metrics" not in [p["name"] for p in c.get("ports", [])]
    assert not [o for o in objs if o["kind"] == "Service"]


@pytest.mark.parametrize("what", ["serviceMonitor", "prometheusRule"])
def test_monitoring_objects_without_metrics_are_refused(what):
    r = template("--set", "metrics.enabled=false", "--set", f"metrics.{what}.enabled=true", check=False)
    assert r.returncode != 0 and f"metrics.{what}.enabled needs metrics.enabled" in r.stderr


@pytest.mark.parametrize("args, message", [
    (("--set", "metrics.agentPort=0"), "/metrics/agentPort"),
    (("--set", "metrics.serviceMonitor.interval=often"), "/metrics/serviceMonitor/interval"),
    (("--set-json", "metrics.prometheusRule.rpcErrorRatio=2"), "/metrics/prometheusRule/rpcErrorRatio"),
    (("--set", "metrics.scrape=true"), "/metrics"),
])
def test_metrics_values_are_checked_by_the_schema(args, message):
    r = template(*args, check=False)
    assert r.returncode != 0 and "schema" in r.stderr and message in r.stderr, r.stderr


def test_the_service_monitor_scrapes_exactly_the_three_metrics_services():
    objs = objects(template(*MONITORING, "--set", "metrics.serviceMonitor.labels.release=prom").stdout)
    sm = one(objs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    selector = sm["spec"]["selector"]["matchLabels"].items()
    selected = sorted(o["metadata"]["name"] for o in objs if o["kind"] == "Service" and
                      selector <= o["metadata"]["labels"].items())
    assert selected == sorted(one(objs, "Service", f"-{c}-metrics")["metadata"]["name"] for c in COMPONENTS)


def _rules(objs) -> dict[str, dict]:
    rule = one(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}


def _selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """Every series selector of a PromQL expression, parsed with Prometheus's grammar (promql-parser, a port of
    its parser): (metric name, {label: value}) of the equality matchers."""
    found = []

    def visit(node, *_):
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name, {m.name: m.value for m in node.matchers.matchers
                                      if str(m.op).endswith(".Equal")}))
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_every_rule_is_valid_promql_with_durations_prometheus_reads(monitoring):
    # What promtool's `check rules` checks of an alerting rule: the expression parses, `for` is a duration,
    # the names are unique and each rule has labels and annotations as strings. A typo that Prometheus would
    # refuse at load time (and so silently drop the whole group in the operator's hands) fails here.
    groups = one(monitoring, "PrometheusRule")["spec"]["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    for g in groups:
        for r in g["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", r["alert"]), r["alert"]
            assert promql_parser.parse(r["expr"]), r["expr"]
            assert promql_parser.parse_duration(r["for"]).total_seconds() > 0, r["for"]
            assert all(isinstance(v, str) for v in {**r["labels"], **r["annotations"]}.values()), r
    with pytest.raises(ValueError):   # the parser refuses what Prometheus refuses
        promql_parser.parse('sum by (job (rate(x_total[5m]))')


@pytest.fixture(scope="module")
def monitoring():
    """Rendered before any function fixture: agent_world's fake runner would answer helm too."""
    return objects(template(*MONITORING, "--set-json", "metrics.prometheusRule.rpcErrorRatio=0.2").stdout)


def test_the_alerts_read_what_the_driver_exports_under_the_service_monitors_job_names(monitoring,
                                                                                      agent_world):  # noqa: F811
    objs = monitoring
    rules = _rules(objs)
    assert set(rules) == {"LvmIscsiCsiPoolDataFillWarning", "LvmIscsiCsiPoolDataFillCritical",
                          "LvmIscsiCsiPoolMetadataFillWarning", "LvmIscsiCsiPoolMetadataFillCritical",
                          "LvmIscsiCsiAgentDown", "LvmIscsiCsiNodeDown", "LvmIscsiCsiRpcErrors"}
    # Every metric an alert reads is one a real agent's scrape (with an RPC counted) carries.
    _, _, ctl, _, scraper = agent_world
    from csi.proto import agent_pb2 as apb
    ctl.GetInfo(apb.GetInfoRequest(), timeout=10)
    exported = {name for name, _ in scraper.samples()}
    for name, rule in rules.items():
        selectors = _selectors(rule["expr"])
        used = {metric for metric, _ in selectors} - {"up"}
        assert selectors and used <= exported, (name, used - exported)
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"]
        assert all(labels.get("namespace") == NAMESPACE for _, labels in selectors), (name, selectors)
    # Each pool against its own levels, data and metadata alike.
    assert rules["LvmIscsiCsiPoolDataFillWarning"]["expr"].split(" > ")[1].startswith(
        "lvm_iscsi_csi_pool_warn_fill_ratio")
    assert "lvm_iscsi_csi_pool_metadata_fill_ratio" in rules["LvmIscsiCsiPoolMetadataFillWarning"]["expr"]
    assert ">= lvm_iscsi_csi_pool_max_fill_ratio" in rules["LvmIscsiCsiPoolDataFillCritical"]["expr"]
    # "Down" is Prometheus's up == 0 for the jobs the ServiceMonitor makes (the Services' names).
    for component in ("agent", "node"):
        svc = one(objs, "Service", f"-{component}-metrics")["metadata"]["name"]
        assert _selectors(rules[f"LvmIscsiCsi{component.title()}Down"]["expr"]) == [
            ("up", {"namespace": NAMESPACE, "job": svc})]
        assert rules[f"LvmIscsiCsi{component.title()}Down"]["expr"].strip().endswith("== 0")
    errors = rules["LvmIscsiCsiRpcErrors"]["expr"]
    assert errors.strip().endswith("> 0.2")
    codes = re.search(r'grpc_code=~"([^"]+)"', errors).group(1).split("|")
    assert "INTERNAL" in codes and not {"OK", "NOT_FOUND", "ALREADY_EXISTS", "ABORTED"} & set(codes)


def test_the_rpc_error_alerts_codes_are_codes_the_interceptor_records():
    registry = CollectorRegistry()
    rpc = metrics.RpcMetrics(registry)
    for code in grpc.StatusCode:
        rpc.observe("/csi.v1.Node/NodeStageVolume", code, 0.01)
    recorded = {s.labels["grpc_code"] for fam in text_string_to_metric_families(generate_latest(registry).decode())
                for s in fam.samples if "grpc_code" in s.labels}
    rule = _rules(objects(template(*MONITORING).stdout))["LvmIscsiCsiRpcErrors"]["expr"]
    codes = set(re.search(r'grpc_code=~"([^"]+)"', rule).group(1).split("|"))
    assert codes <= recorded
