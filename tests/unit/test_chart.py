"""The Helm chart (deploy/helm/lvm-iscsi-csi), its plain rendering (deploy/manifests) and their security scan.

What runs here, all offline but for the Go module proxy:
- helm, built by scripts/setup into the cache: lint, template with the default values and the value sets in the
  chart's ci/ directory, and template --dry-run=server against a fake API server on 127.0.0.1 for `lookup`;
- kubernetes-validate's bundled OpenAPI schemas, strict (unknown fields rejected), for every rendered object;
- the external-snapshotter CRDs, downloaded from the Go module proxy into the cache at the csi-snapshotter version
  the chart pins, for the snapshot objects;
- checkov with its downloads switched off, over the default rendering: its findings must be exactly the ones the
  chart README lists with their reasons.
A missing tool fails the test, naming scripts/setup; nothing is skipped.
"""

from __future__ import annotations

import base64
import copy
import datetime
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from csi import metrics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "lvm-iscsi-csi"
MANIFESTS = ROOT / "deploy" / "manifests"
CACHE = Path(os.environ.get("CSI_CACHE", "/var/cache/lvm-iscsi-csi"))
RELEASE = "lvm-iscsi-csi"
NAMESPACE = "lvm-iscsi-csi"
# The chart's kubeVersion floor and the newest release kubernetes-validate bundles a schema for.
KUBE_VERSIONS = ("1.34.0", "1.37.0")
RENDER_KUBE_VERSION = "1.37.0"
VALUE_SETS = ["default"] + sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
TLS_DIR = "/run/lvm-iscsi-csi/tls"
TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount"


# ---------------------------------------------------------------------------------------------- tools

def _missing(what: str, where: str) -> None:
    pytest.fail(f"{what} not found ({where}): run scripts/setup", pytrace=False)


@functools.cache
def helm_binary() -> str:
    path = Path(os.environ.get("HELM", CACHE / "bin" / "helm"))
    if not os.access(path, os.X_OK):
        _missing("helm", str(path))
    return str(path)


@functools.cache
def checkov_binary() -> str:
    candidates = [os.environ.get("CHECKOV", ""), str(Path(sys.executable).parent / "checkov"),
                  str(CACHE / "checkov" / "bin" / "checkov")]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    _missing("checkov", ", ".join(c for c in candidates if c))


@functools.cache
def go_binary() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    if not found:
        _missing("go (for the snapshot CRDs from the Go module proxy)", "PATH, /usr/local/go/bin")
    return found


def helm(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({r.returncode}):\n{r.stderr}", pytrace=False)
    return r


def values_args(value_set: str) -> list[str]:
    return [] if value_set == "default" else ["-f", str(CHART / "ci" / f"{value_set}-values.yaml")]


# What a cluster with the external-snapshotter CRDs serves (the chart creates its VolumeSnapshotClass only there).
SNAPSHOT_API = ("--api-versions", "snapshot.storage.k8s.io/v1/VolumeSnapshotClass")


def template(*args: str, check: bool = True, snapshot_api: bool = True) -> subprocess.CompletedProcess:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", RENDER_KUBE_VERSION,
                *(SNAPSHOT_API if snapshot_api else ()), *args, check=check)


def objects(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@functools.cache
def _rendered(value_set: str) -> tuple[dict, ...]:
    return tuple(objects(template(*values_args(value_set)).stdout))


def rendered(value_set: str = "default") -> list[dict]:
    return copy.deepcopy(list(_rendered(value_set)))


@functools.cache
def values(value_set: str = "default") -> dict:
    """The values a value set amounts to: values.yaml with the set's file merged over it, as helm merges."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    if value_set != "default":
        merged = _merge(merged, yaml.safe_load((CHART / "ci" / f"{value_set}-values.yaml").read_text()))
    return merged


def _merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v) if k in base else v
        return out
    return over


def one(objs: list[dict], kind: str, suffix: str = "") -> dict:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def containers(workload: dict) -> dict[str, dict]:
    return {c["name"]: c for c in workload["spec"]["template"]["spec"]["containers"]}


def mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def volumes(workload: dict) -> dict[str, dict]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}


def host_path_of(workload: dict, container: dict, mount_path: str) -> str | None:
    m = mounts(container).get(mount_path)
    return volumes(workload)[m["name"]].get("hostPath", {}).get("path") if m else None


# ---------------------------------------------------------------------------------------------- lint and render

@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_is_clean(value_set):
    r = helm("lint", str(CHART), "--strict", "--kube-version", RENDER_KUBE_VERSION, *values_args(value_set))
    assert "0 chart(s) failed" in r.stdout
    assert "[WARNING]" not in r.stdout and "[ERROR]" not in r.stdout, r.stdout


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_renders_the_expected_objects(value_set):
    kinds = sorted({o["kind"] for o in rendered(value_set)})
    expected = {"ClusterRole", "ClusterRoleBinding", "ConfigMap", "CSIDriver", "DaemonSet", "Deployment", "Role",
                "RoleBinding", "ServiceAccount", "StorageClass", "NetworkPolicy"}
    assert expected <= set(kinds), kinds
    names = [(o["kind"], o["metadata"]["name"]) for o in rendered(value_set)]
    assert len(names) == len(set(names)), "duplicate objects"


# ---------------------------------------------------------------------------------------------- schemas

def _validate_k8s(obj: dict, version: str) -> str | None:
    """None when valid; the error otherwise. Snapshot kinds are the CRDs' business (below)."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.utils.SchemaNotFoundError:
        if obj["apiVersion"].startswith(SNAPSHOT_GROUP + "/"):
            return None
        return f"no schema for {obj['apiVersion']} {obj['kind']} in Kubernetes {version}"
    except kubernetes_validate.ValidationError as exc:
        return f"{obj['kind']}/{obj['metadata'].get('name')}: {exc.message} at {list(exc.absolute_path)}"
    except kubernetes_validate.utils.VersionNotSupportedError:
        pytest.fail(f"kubernetes-validate {kubernetes_validate.__version__} has no Kubernetes {version} schemas: "
                    "run scripts/setup (the test extra needs kubernetes-validate>=1.37)", pytrace=False)
    return None


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_object_validates_strictly_against_kubernetes(value_set, kube_version):
    errors = [e for o in rendered(value_set) if (e := _validate_k8s(o, kube_version))]
    assert not errors, "\n".join(errors)


# The OpenAPI schemas carry types, not the API server's name rules (apimachinery's validation): a port name
# of 16 characters renders and validates above, and the API server still rejects the pod. The first Kubernetes
# end-to-end run failed exactly so (http-provisioner, http-snapshotter).
IANA_SVC_NAME = re.compile(r"(?=.{1,15}$)(?=.*[a-z])[a-z0-9]+(-[a-z0-9]+)*")
DNS1123_LABEL = re.compile(r"(?=.{1,63}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def name_rule_errors(obj: dict) -> list[str]:
    spec = obj.get("spec", {}).get("template", {}).get("spec")
    if not spec:
        return []
    errors = []
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    for c in spec.get("initContainers", []) + spec["containers"]:
        if not DNS1123_LABEL.fullmatch(c["name"]):
            errors.append(f"{where}: container name {c['name']!r}")
        for port in c.get("ports", []):
            if "name" in port and not IANA_SVC_NAME.fullmatch(port["name"]):
                errors.append(f"{where}/{c['name']}: port name {port['name']!r} (at most 15 of [a-z0-9-])")
        names = {p.get("name") for p in c.get("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            for handler in ("httpGet", "tcpSocket"):
                port = c.get(probe, {}).get(handler, {}).get("port")
                if isinstance(port, str) and port not in names:
                    errors.append(f"{where}/{c['name']}: {probe} names port {port!r}, which it does not declare")
    for v in spec.get("volumes", []):
        if not DNS1123_LABEL.fullmatch(v["name"]):
            errors.append(f"{where}: volume name {v['name']!r}")
    return errors


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_names_follow_the_api_servers_rules(value_set):
    errors = [e for o in rendered(value_set) for e in name_rule_errors(o)]
    assert not errors, "\n".join(errors)


def test_driver_containers_have_a_startup_probe_before_liveness():
    # The node plugin cleans stale iSCSI sessions before it answers Probe: liveness must not kill it meanwhile.
    for kind, suffix in (("Deployment", "controller"), ("DaemonSet", "node")):
        driver = containers(one(rendered(), kind, suffix))["driver"]
        startup = driver["startupProbe"]
        assert startup["httpGet"]["port"] == driver["livenessProbe"]["httpGet"]["port"] == "healthz"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, kind
        assert "initialDelaySeconds" not in driver["livenessProbe"]


def test_node_driver_registrar_has_a_startup_probe_before_liveness():
    # Registration waits for the driver: under load the registrar was restarted by liveness (3 x 30 s) while
    # the node plugin was still starting (Kubernetes e2e run, install test: restartCount 1).
    registrar = containers(one(rendered(), "DaemonSet", "node"))["node-driver-registrar"]
    startup, liveness = registrar["startupProbe"], registrar["livenessProbe"]
    assert startup["httpGet"] == liveness["httpGet"] == {"path": "/healthz", "port": "http-registrar"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert "initialDelaySeconds" not in liveness


def test_node_driver_registrar_is_the_cve_fixed_release_with_its_http_health_endpoint():
    """v2.17.0 fixes CVE-2026-33186 (its CHANGELOG; gRPC-Go v1.78.0 -> v1.81.0). Its health check is the HTTP
    endpoint: --mode=kubelet-registration-probe is deprecated upstream since v2.9."""
    for value_set in VALUE_SETS:
        ds = one(rendered(value_set), "DaemonSet", "-node")
        registrar = containers(ds)["node-driver-registrar"]
        tag = re.search(r":(v[\d.]+)$", registrar["image"])
        if tag:   # pinned by digest in custom-selectors: the tag is in the values
            assert tuple(int(x) for x in tag.group(1)[1:].split(".")) >= (2, 17, 0), registrar["image"]
        port = values(value_set)["sidecars"]["nodeDriverRegistrar"]["httpPort"]
        assert f"--http-endpoint=:{port}" in registrar["args"]
        assert registrar["ports"] == [{"name": "http-registrar", "containerPort": port, "protocol": "TCP"}]
        text = json.dumps(ds)
        assert "kubelet-registration-probe" not in text and "--mode" not in text
        # host network: every port of the pod is a port of the node, so no two may be the same
        ports = [p["containerPort"] for c in containers(ds).values() for p in c.get("ports", [])]
        assert len(ports) == len(set(ports)) == (3 if values(value_set)["metrics"]["enabled"] else 2), ports
    assert values()["sidecars"]["nodeDriverRegistrar"]["image"]["tag"] == "v2.17.0"


# Sidecar feature gates upstream has made GA at the pinned versions: passing them only earns a warning now and a
# refusal to start once upstream deletes the gate (external-snapshotter announced it for CSIVolumeGroupSnapshot).
GA_GATES = {"Topology": "external-provisioner v5 (GA, on by default)",
            "CSIVolumeGroupSnapshot": "external-snapshotter v8.7.0 (GA, on by default)",
            "VolumeAttributesClass": "external-provisioner v6 (GA, on by default)"}


def test_no_sidecar_is_given_a_feature_gate_upstream_made_ga():
    for value_set in VALUE_SETS:
        for w in (o for o in rendered(value_set) if o["kind"] in ("Deployment", "DaemonSet")):
            for c in containers(w).values():
                for arg in c.get("args", []):
                    if arg.startswith("--feature-gates="):
                        gates = {g.split("=")[0] for g in arg.split("=", 1)[1].split(",")}
                        assert not gates & set(GA_GATES), (value_set, c["name"], arg)


def test_controller_sidecars_have_a_startup_probe_before_liveness():
    """The sidecars open their HTTP endpoint only after reaching the driver's socket. On the Kubernetes e2e
    cluster the driver took over 30 s to start and csi-attacher was restarted by its liveness probe (10 s initial
    delay, one failure allowed): every sidecar probed over HTTP must wait for a startup probe instead."""
    for value_set in VALUE_SETS:
        for name, c in containers(one(rendered(value_set), "Deployment", "controller")).items():
            liveness = c["livenessProbe"]
            if "httpGet" not in liveness:
                continue
            startup = c.get("startupProbe")
            assert startup and startup["httpGet"] == liveness["httpGet"], (value_set, name)
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, (value_set, name)
            assert "initialDelaySeconds" not in liveness, (value_set, name)


def test_csi_attacher_starts_last():
    """csi-attacher gives the driver one second (hard-coded upstream) for its first calls and exits when that
    passes; started while kubelet and containerd were still starting the pod's later containers on a one-CPU
    node, it exited once (the Kubernetes tier). Last, nothing of its pod starts after it."""
    for value_set in VALUE_SETS:
        assert list(containers(one(rendered(value_set), "Deployment", "controller")))[-1] == "csi-attacher"


def test_controller_sidecars_start_once_the_driver_answers(tmp_path):
    """kubelet starts a pod's containers in order and the next one only once the postStart hook of the one
    before returned: the driver comes first and its hook waits until the driver answers on its socket, so no
    sidecar starts (and gives up on its first connection, and is restarted) before the driver answers. The
    hook's command is the driver's CLI, run here against nothing, a socket that accepts connections but does
    not speak (a driver still busy starting), and a driver."""
    import socket
    from csi import cli, server
    from csi.identity import IdentityService
    from csi.proto import csi_pb2_grpc
    for value_set in VALUE_SETS:
        deployment = one(rendered(value_set), "Deployment", "controller")
        order = list(containers(deployment))
        assert order[0] == "driver", (value_set, order)
        command = containers(deployment)["driver"]["lifecycle"]["postStart"]["exec"]["command"]
        endpoint = next(a for a in containers(deployment)["driver"]["args"] if a.startswith("--endpoint="))
        assert command[:2] == ["lvm-iscsi-csi", "wait-for-driver"]
        assert endpoint == "--endpoint=unix://" + command[2], (value_set, command, endpoint)
    path = tmp_path / "csi.sock"
    hook = cli.parser().parse_args(["wait-for-driver", str(path), "--timeout=1"])
    assert hook.func(hook) == 1                      # nothing listens: the hook fails (kubelet restarts)
    with socket.socket(socket.AF_UNIX) as silent:    # accepts connections (the kernel does), never answers
        silent.bind(str(path))
        silent.listen(8)
        hook = cli.parser().parse_args(["wait-for-driver", str(path), "--timeout=2"])
        assert hook.func(hook) == 1
    path.unlink()
    driver = server.make_server(max_workers=2)
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService("test.csi", lambda: "not yet"), driver)
    server.serve(driver, f"unix://{path}")
    try:
        hook = cli.parser().parse_args(["wait-for-driver", str(path), "--timeout=20"])
        assert hook.func(hook) == 0                  # answers (not ready yet: the sidecars wait for that)
    finally:
        driver.stop(None)


def test_name_rules_catch_a_long_port_name():
    deployment = copy.deepcopy(one(rendered(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] = "http-provisioner"
    assert any("port name 'http-provisioner'" in e for e in name_rule_errors(deployment))


def test_strict_validation_catches_a_misspelled_field():
    # The check above must be able to fail: one misspelled field in a real object.
    deployment = one(rendered(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    assert _validate_k8s(deployment, RENDER_KUBE_VERSION)


@functools.cache
def snapshot_crd_schemas() -> dict[str, dict]:
    """kind -> openAPIV3Schema of the served snapshot.storage.k8s.io/v1 CRDs, at the pinned csi-snapshotter tag."""
    tag = yaml.safe_load((CHART / "values.yaml").read_text())["sidecars"]["snapshotter"]["image"]["tag"]
    major = tag.lstrip("v").split(".")[0]
    module = f"github.com/kubernetes-csi/external-snapshotter/client/v{major}@{tag}"
    env = {**os.environ, "GOPATH": str(CACHE / "go"), "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"}
    env.pop("GOMODCACHE", None)
    r = subprocess.run([go_binary(), "mod", "download", "-json", module], capture_output=True, text=True,
                       cwd=CACHE if CACHE.is_dir() else "/", env=env, timeout=600)
    if r.returncode != 0:
        pytest.fail(f"go mod download {module} failed (Go module proxy unreachable? run scripts/setup):\n"
                    f"{r.stdout}\n{r.stderr}", pytrace=False)
    crd_dir = Path(json.loads(r.stdout)["Dir"]) / "config" / "crd"
    schemas = {}
    for path in sorted(crd_dir.glob(f"{SNAPSHOT_GROUP}_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["name"] == "v1" and version.get("served"):
                schemas[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    assert {"VolumeSnapshot", "VolumeSnapshotClass", "VolumeSnapshotContent"} <= set(schemas), sorted(schemas)
    return schemas


def _strict(schema):
    """The API server prunes and (with strict field validation) rejects unknown fields: forbid them here."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@functools.cache
def _object_meta_validator():
    defs = json.loads((Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
                       / f"v{RENDER_KUBE_VERSION}-local-strict" / "_definitions.json").read_text())
    return jsonschema.Draft202012Validator({"$ref": "#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
                                            "$defs": defs["$defs"]})


def _validate_snapshot_object(obj: dict) -> list[str]:
    schema = snapshot_crd_schemas().get(obj["kind"])
    if schema is None or obj["apiVersion"] != f"{SNAPSHOT_GROUP}/v1":
        return [f"{obj['apiVersion']} {obj['kind']} is not a served snapshot CRD version"]
    schema = _strict(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # checked against ObjectMeta below
    errors = [f"{obj['kind']}/{obj['metadata'].get('name')}: {e.message} at {list(e.absolute_path)}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
    errors += [f"{obj['kind']} metadata: {e.message}" for e in _object_meta_validator().iter_errors(obj["metadata"])]
    return errors


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_snapshot_objects_validate_against_the_snapshot_crds(value_set):
    snapshot_objects = [o for o in rendered(value_set) if o["apiVersion"].startswith(SNAPSHOT_GROUP + "/")]
    create = values(value_set)["volumeSnapshotClass"]["create"]
    assert [o["kind"] for o in snapshot_objects] == (["VolumeSnapshotClass"] if create else [])
    errors = [e for o in snapshot_objects for e in _validate_snapshot_object(o)]
    assert not errors, "\n".join(errors)


def test_snapshot_class_only_where_the_cluster_serves_the_snapshot_api(tmp_path):
    """On a cluster without the external-snapshotter CRDs a VolumeSnapshotClass fails the whole `helm install`
    ("no matches for kind VolumeSnapshotClass"): the chart skips it there, and the install notes say so."""
    without = objects(template(snapshot_api=False).stdout)
    assert not [o for o in without if o["kind"] == "VolumeSnapshotClass"]
    assert {o["kind"] for o in without} == {o["kind"] for o in rendered()} - {"VolumeSnapshotClass"}
    assert [o["kind"] for o in rendered() if o["kind"] == "VolumeSnapshotClass"] == ["VolumeSnapshotClass"]
    skipped = "VolumeSnapshotClass lvm-iscsi-snapshot was not created"
    assert skipped in render_notes(tmp_path / "a", snapshot_api=False)
    assert skipped not in render_notes(tmp_path / "b")
    # Not asked for: nothing created and nothing to say about it.
    assert skipped not in render_notes(tmp_path / "c", "--set", "volumeSnapshotClass.create=false",
                                       snapshot_api=False)


def test_snapshot_crd_validation_catches_a_wrong_field():
    cls = one(rendered(), "VolumeSnapshotClass")
    assert not _validate_snapshot_object(cls)
    assert _validate_snapshot_object({**cls, "deletionPolicy": "Keep"})
    assert _validate_snapshot_object({**cls, "parameter": {"a": "b"}})


# ---------------------------------------------------------------------------------------------- values schema

@pytest.mark.parametrize("args,message", [
    (["--set-string", "controller.replicas=two"], "/controller/replicas"),
    (["--set", "controller.replicas=0"], "/controller/replicas"),
    (["--set-string", "tls.generate=yes"], "/tls/generate"),
    (["--set", "nope=1"], "'nope' not allowed"),
    (["--set", "agent.pool=x"], "'pool' not allowed"),
    (["--set", "agent.port=70000"], "/agent/port"),
    (["--set", "logLevel=verbose"], "/logLevel"),
    (["--set", "clusterId=Prod_1"], "/clusterId"),
    (["--set", "clusterId=snapshots"], "/clusterId"),
    (["--set", "image.digest=sha256:abc"], "/image/digest"),
    (["--set", "sidecars.provisioner.image.tag=latest"], "/sidecars/provisioner/image/tag"),
    (["--set", "sidecars.resizer.timeout=3 minutes"], "/sidecars/resizer/timeout"),
    (["--set", "storageClasses[0].name=x,storageClasses[0].pool=thin,storageClasses[0].type=thinn"],
     "/storageClasses/0/type"),
    (["--set", "storageClasses[0].name=x,storageClasses[0].pool=thin,storageClasses[0].type=thin,"
               "storageClasses[0].fsType=btrfs"], "/storageClasses/0/fsType"),
    (["--set", "storageNodes[0].name=s1,storageNodes[0].zone=a"], "missing property 'address'"),
    (["--set", "storageNodes[0].name=s1,storageNodes[0].address=10.0.0.1,storageNodes[0].zone=a"],
     "/storageNodes/0/address"),
    (["--set", "storageNodes[0].name=S1,storageNodes[0].address=h:1,storageNodes[0].zone=a"],
     "/storageNodes/0/name"),
    (["--set-json", 'storageNodes=[{"name":"s1","address":"h:1","zone":7}]'], "/storageNodes/0/zone"),
    (["--set-json", 'agent.pools=[{"name":"p","vg":"snapshot-vg"}]'], "/agent/pools/0/vg"),
    (["--set-json", 'agent.pools=[{"name":"p","vg":"vg","overprovisionRatio":"4"}]'],
     "/agent/pools/0/overprovisionRatio"),
    (["--set-json", 'agent.devices=["sdb"]'], "/agent/devices/0"),
    (["--set-json", 'node.tolerations={"operator":"Exists"}'], "/node/tolerations"),
    (["--set", "csiDriver.fsGroupPolicy=Always"], "/csiDriver/fsGroupPolicy"),
    (["--set", "volumeSnapshotClass.deletionPolicy=Keep"], "/volumeSnapshotClass/deletionPolicy"),
    (["--set", "logFormat=xml"], "/logFormat"),
    (["--set-json", 'node.extraArgs=["max-volumes=3"]'], "/node/extraArgs/0"),
    (["--set-json", 'sidecars.provisioner.extraArgs="--v=5"'], "/sidecars/provisioner/extraArgs"),
])
def test_values_schema_rejects_wrong_values(args, message):
    r = template(*args, check=False)
    assert r.returncode != 0, f"accepted: {args}"
    assert "schema" in r.stderr and message in r.stderr, r.stderr


@pytest.mark.parametrize("args,message", [
    (["--set-json", 'storageNodes=[{"name":"s1","address":"h:1","zone":"a"},{"name":"s1","address":"h:2","zone":"b"}]',
      "--set-json", 'agent.devices=["/dev/sdb"]'], 'node "s1" is listed twice'),
    (["--set-json", 'storageNodes=[{"name":"s1","address":"h:7600","zone":"a"}]'], "agent.devices is empty"),
    (["--set-json", 'storageClasses=[{"name":"a","pool":"thin","type":"thin","isDefault":true},'
                    '{"name":"b","pool":"thin","type":"thin","isDefault":true}]'], "more than one class has isDefault"),
    (["--set-json", 'storageClasses=[{"name":"x","pool":"nope","type":"thin"}]'], 'pool "nope"'),
    (["--set-json", 'storageClasses=[{"name":"x","pool":"thick","type":"thin"}]'], "has no thinPool"),
    (["--set-json", 'storageClasses=[{"name":"x","pool":"thin","type":"thin","wipe":true}]'], "thick volumes only"),
    (["--set-json", 'agent.pools=[{"name":"t","vg":"vg","overprovisionRatio":2}]',
      "--set-json", "storageClasses=[]"], "overprovisionRatio must be 1"),
    (["--set-json", 'agent.pools=[{"name":"t","vg":"vg","thinPool":"tp","warnFillPercent":95,"maxFillPercent":90}]',
      "--set-json", "storageClasses=[]"], "warnFillPercent must not exceed"),
])
def test_chart_rejects_inconsistent_values(args, message):
    r = template(*args, check=False)
    assert r.returncode != 0, f"accepted: {args}"
    assert message in r.stderr, r.stderr


def test_helm_template_without_kube_version_works_or_says_why():
    """Helm assumes a Kubernetes version when `helm template` gets no --kube-version (v1.20.0 in a helm built from
    source, as scripts/setup builds it). Before, the chart's kubeVersion made that fail with only "incompatible
    with Kubernetes v1.20.0"; now the render either works or the message names the minimum, why, and the fix."""
    def says_why(stderr: str, version: str = r"v\d+\.\d+\.\S+") -> bool:
        return bool(re.search(rf"Kubernetes {version} is too old for this chart: it needs 1\.34 or later .*"
                              r"VolumeAttributesClass.*pass --kube-version", stderr))

    bare = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, check=False)
    assert bare.returncode == 0 or says_why(bare.stderr), bare.stderr
    assert "chart requires kubeVersion" not in bare.stderr
    old = template("--kube-version", "1.33.9", check=False)
    assert old.returncode != 0 and says_why(old.stderr, r"v1\.33\.9"), old.stderr
    for version in ("1.34.0", "v1.34.2-gke.1200"):
        assert template("--kube-version", version).returncode == 0, version


def test_the_chart_works_as_a_subchart(tmp_path):
    """A parent chart's dependency condition (lvm-iscsi-csi.enabled) and its global values reach this chart's
    values; the strict schema rejected both ("additional properties 'enabled' not allowed")."""
    parent = tmp_path / "platform"
    (parent / "charts").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / CHART.name)
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    (parent / "Chart.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v2", "name": "platform", "version": "1.0.0",
        "dependencies": [{"name": CHART.name, "version": version, "repository": f"file://{CHART}",
                          "condition": f"{CHART.name}.enabled"}]}))
    (parent / "values.yaml").write_text(yaml.safe_dump({
        "global": {"imageRegistry": "registry.example.com"},
        CHART.name: {"enabled": True, "clusterId": "platform"}}))

    def render(*args: str) -> list[dict]:
        return objects(helm("template", "platform", str(parent), "--namespace", NAMESPACE, "--kube-version",
                            RENDER_KUBE_VERSION, *args).stdout)

    kinds = {o["kind"] for o in render()}
    assert {"CSIDriver", "Deployment", "DaemonSet", "StorageClass"} <= kinds, kinds
    assert not render("--set", f"{CHART.name}.enabled=false")
    # Only these two: any other unknown key is still refused.
    r = helm("template", "platform", str(parent), "--namespace", NAMESPACE, "--kube-version", RENDER_KUBE_VERSION,
             "--set", f"{CHART.name}.enable=true", check=False)
    assert r.returncode != 0 and "'enable' not allowed" in r.stderr, r.stderr


# Values that are Kubernetes structures passed through as they are: their fields are Kubernetes' to document.
PASSTHROUGH = {"podSecurityContext", "containerSecurityContext", "securityContext", "resources", "updateStrategy",
               "nodeSelector", "affinity", "tolerations", "podLabels", "podAnnotations", "image"}


def test_values_yaml_is_documented_field_by_field():
    """Every key of values.yaml down to the third level has a comment right above it, but for list items after the
    first and the fields of Kubernetes structures passed through (resources, securityContext, ...)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented, stack, list_items_at = [], [], None
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if not stripped or stripped.startswith("#"):
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if stripped.startswith("- "):
            # Only the first item of a list documents its fields; the others follow it.
            first = list_items_at != indent
            list_items_at = indent
            if first:
                stack.append((indent, "-"))
                continue
            stack.append((indent, "-skip"))
            continue
        m = re.match(r"([A-Za-z][A-Za-z0-9]*):", stripped)
        if not m:
            continue
        keys = [k for _, k in stack]
        commented = lines[i - 1].lstrip().startswith(("#", "- #"))
        if len(keys) < 3 and "-skip" not in keys and not PASSTHROUGH & set(keys) and not commented:
            undocumented.append(f"line {i + 1}: {line.strip()}")
        stack.append((indent, m.group(1)))
    assert not undocumented, "values.yaml keys without a comment:\n" + "\n".join(undocumented)


def test_values_yaml_matches_its_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))


# ---------------------------------------------------------------------------------------------- workloads

def test_controller_runs_the_sidecars_with_leader_election_topology_and_capacity():
    dep = one(rendered(), "Deployment", "-controller")
    c = containers(dep)
    assert list(c) == ["driver", "csi-provisioner", "csi-snapshotter", "csi-resizer", "liveness-probe", "csi-attacher"]
    for name in ("csi-provisioner", "csi-attacher", "csi-snapshotter", "csi-resizer"):
        assert "--leader-election=true" in c[name]["args"], name
        assert c[name]["livenessProbe"]["httpGet"]["path"] == "/healthz/leader-election", name
    prov = c["csi-provisioner"]["args"]
    for flag in ("--enable-capacity=true", "--capacity-ownerref-level=2",
                 "--strict-topology=true", "--extra-create-metadata=true", "--default-fstype=ext4", "--timeout=300s"):
        assert flag in prov
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["csi-provisioner"]["env"]}
    assert env == {"POD_NAME": "metadata.name", "NAMESPACE": "metadata.namespace"}
    assert "--handle-volume-inuse-error=false" in c["csi-resizer"]["args"]
    assert not [a for name in c for a in c[name].get("args", []) if a.startswith("--feature-gates")]
    assert c["driver"]["args"][:1] == ["controller"]
    assert c["driver"]["livenessProbe"]["httpGet"]["port"] == "healthz"


def test_controller_is_unprivileged_and_its_token_reaches_only_what_calls_the_api():
    dep = one(rendered(), "Deployment", "-controller")
    spec = dep["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] >= 10000
    assert "hostNetwork" not in spec
    for name, c in containers(dep).items():
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        # The sidecars and the driver (placement journal, storage node discovery); not the liveness probe.
        has_token = "/var/run/secrets/kubernetes.io/serviceaccount" in mounts(c)
        assert has_token == (name.startswith("csi-") or name == "driver"), name
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name
    cfg = volumes(dep)["config"]["projected"]["sources"]
    # no static list (storage nodes are discovered); the CA's certificate and key, and the bundle all pods trust
    assert [i["path"] for s in cfg for i in next(iter(s.values()))["items"]] == ["ca/ca.crt", "ca/ca.key", "ca.crt"]
    static = volumes(one(rendered("multi-zone"), "Deployment", "-controller"))["config"]["projected"]["sources"]
    assert [i["path"] for s in static for i in next(iter(s.values()))["items"]][0] == "storage-nodes.yaml"
    assert mounts(containers(dep)["driver"])["/etc/lvm-iscsi-csi"]["readOnly"] is True


def test_node_plugin_reaches_the_hosts_iscsid_and_kubelet():
    ds = one(rendered(), "DaemonSet", "-node")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    c = containers(ds)
    assert list(c) == ["driver", "node-driver-registrar", "liveness-probe"]
    driver = c["driver"]
    assert driver["securityContext"]["privileged"] is True
    kubelet = mounts(driver)["/var/lib/kubelet"]
    assert kubelet["mountPropagation"] == "Bidirectional"
    for path in ("/dev", "/sys", "/etc/iscsi", "/var/lib/iscsi", "/run/lock/iscsi", "/lib/modules"):
        assert host_path_of(ds, driver, path) == path, path
    assert mounts(driver)["/lib/modules"]["readOnly"] is True
    assert volumes(ds)["etc-iscsi"]["hostPath"]["type"] == "Directory"
    assert "--initiator-name-file=/etc/iscsi/initiatorname.iscsi" in driver["args"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in driver["env"]
    # Only the driver container reads the API server (its Node's zone label, its certificate's CSR).
    assert [n for n, x in c.items() if TOKEN in mounts(x)] == ["driver"]
    assert [n for n, x in c.items() if TLS_DIR in mounts(x)] == ["driver"]
    assert volumes(ds)["tls"]["emptyDir"]["medium"] == "Memory"
    assert volumes(ds)["config"]["projected"]["sources"] == [
        {"configMap": {"name": f"{RELEASE}-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]
    reg = c["node-driver-registrar"]
    sock = "/var/lib/kubelet/plugins/lvm-iscsi.csi.dev/csi.sock"
    assert f"--kubelet-registration-path={sock}" in reg["args"] and f"--csi-address={sock}" in reg["args"]
    assert host_path_of(ds, reg, "/registration") == "/var/lib/kubelet/plugins_registry"
    assert host_path_of(ds, reg, str(Path(sock).parent)) == str(Path(sock).parent)


def test_agent_runs_on_the_selected_storage_nodes_with_what_lvm_and_lio_need():
    for value_set in VALUE_SETS:
        ds = one(rendered(value_set), "DaemonSet", "-agent")
        spec = ds["spec"]["template"]["spec"]
        vals = values(value_set)["agent"]
        assert spec["nodeSelector"] == vals["nodeSelector"], value_set
        assert spec.get("tolerations", []) == vals["tolerations"], value_set
        assert spec.get("affinity", {}) == vals["affinity"], value_set
        assert spec["hostNetwork"] is True and "hostPID" not in spec and "hostIPC" not in spec
        assert spec["automountServiceAccountToken"] is False
        agent = containers(ds)["agent"]
        # its token (for its certificate's CSR, mounted explicitly), its certificate in memory, the CA bundle
        assert TOKEN in mounts(agent) and TLS_DIR in mounts(agent)
        assert volumes(ds)["tls"]["emptyDir"]["medium"] == "Memory"
        assert agent["securityContext"]["privileged"] is True
        for path in ("/dev", "/sys/kernel/config", "/run/lvm", "/run/lock/lvm", "/lib/modules", "/etc/target"):
            assert host_path_of(ds, agent, path) == path, path
        assert host_path_of(ds, agent, "/var/lib/lvm-iscsi-csi") == vals["stateDir"]
        assert volumes(ds)["state"]["hostPath"]["type"] == "DirectoryOrCreate"
        assert "/etc/lvm" not in mounts(agent) and "/run/udev" not in mounts(agent)
        if vals["portalCidr"]:
            assert [a for a in agent["args"] if a.startswith("--portal")] == [
                f"--portal-cidr={vals['portalCidr']}", f"--portal-port={vals['portalPort']}"], value_set
            assert "HOST_IP" not in {e["name"] for e in agent["env"]}
        else:
            assert [a for a in agent["args"] if a.startswith("--portal")] == [
                f"--portal=$(HOST_IP):{vals['portalPort']}"], value_set
        assert f"--listen={vals['listenAddress']}:{vals['port']}" in agent["args"]
        for probe in ("startupProbe", "livenessProbe"):
            assert agent[probe]["tcpSocket"]["port"] == "grpc"
        # ready once its start brought every volume back (csi/metrics.py READY_PATH), or once it listens
        ready = agent["readinessProbe"]
        if any(a.startswith("--metrics-address=") for a in agent["args"]):
            assert ready["httpGet"] == {"path": metrics.READY_PATH, "port": "metrics"} and "tcpSocket" not in ready
        else:
            assert ready["tcpSocket"]["port"] == "grpc" and "httpGet" not in ready
        assert agent["ports"][0]["containerPort"] == vals["port"]


def test_without_the_metrics_port_the_agent_is_ready_once_it_listens():
    objs = objects(template("--set", "metrics.enabled=false").stdout)
    agent = containers(one(objs, "DaemonSet", "-agent"))["agent"]
    assert not any(a.startswith("--metrics-address") for a in agent["args"])
    assert agent["readinessProbe"]["tcpSocket"]["port"] == "grpc" and "httpGet" not in agent["readinessProbe"]


def test_agent_holds_rtslibs_backstore_lock_on_the_hosts_run_directory():
    """rtslib-fb creates and flocks a file in /var/run whenever it makes a backstore. The agent's root file system
    is read-only, so without a mount there CreateVolume fails with EROFS (seen on the Kubernetes e2e cluster); and
    the lock serialises index choices only if it is the host's file, which a targetcli on the host also takes."""
    from rtslib_fb import tcm

    lock = Path(tcm.lock_file)
    assert lock.parent == Path("/var/run"), tcm.lock_file   # Debian's /var/run is a link to /run
    for value_set in VALUE_SETS:
        ds = one(rendered(value_set), "DaemonSet", "-agent")
        agent = containers(ds)["agent"]
        assert agent["securityContext"]["readOnlyRootFilesystem"] is True, value_set
        mount = mounts(agent).get(str(lock))
        assert mount is not None and not mount.get("readOnly"), (value_set, sorted(mounts(agent)))
        assert volumes(ds)[mount["name"]]["hostPath"] == {"path": f"/run/{lock.name}", "type": "FileOrCreate"}


def test_agent_holds_its_own_backstore_lock_on_the_hosts_lock_directory():
    """The agent's lock around making a backstore (lio.STORE_LOCK, shared by the agents of every cluster on the
    node) must be in a host directory mounted writable: it once sat in the container's read-only /run, and every
    CreateVolume in the Kubernetes tier failed with EROFS."""
    from csi.storage import lio

    for value_set in VALUE_SETS:
        ds = one(rendered(value_set), "DaemonSet", "-agent")
        agent = containers(ds)["agent"]
        mount = mounts(agent).get(str(lio.STORE_LOCK.parent))
        assert mount is not None and not mount.get("readOnly"), (value_set, sorted(mounts(agent)))
        assert volumes(ds)[mount["name"]]["hostPath"] == {"path": str(lio.STORE_LOCK.parent),
                                                          "type": "DirectoryOrCreate"}


def test_rendered_args_and_config_files_are_accepted_by_the_driver(tmp_path, monkeypatch):
    """The contract with the driver: every role's args parse with its CLI, its config files load."""
    from csi import cli
    from csi.config import AgentConfig, ControllerConfig

    objs = rendered("multi-zone")
    cms = {o["metadata"]["name"]: o["data"] for o in objs if o["kind"] == "ConfigMap"}
    (tmp_path / "storage-nodes.yaml").write_text(cms[f"{RELEASE}-controller"]["storage-nodes.yaml"])
    (tmp_path / "agent.yaml").write_text(cms[f"{RELEASE}-agent"]["agent.yaml"])
    env = {"NODE_NAME": "storage-a1", "HOST_IP": "10.0.1.11"}

    def parse(workload, container):
        args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in containers(workload)[container]["args"]]
        try:
            return cli.parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{workload['metadata']['name']}/{container}: the driver's CLI rejects {args}")

    ctrl = parse(one(objs, "Deployment", "-controller"), "driver")
    node = parse(one(objs, "DaemonSet", "-node"), "driver")
    agent = parse(one(objs, "DaemonSet", "-agent"), "agent")
    assert (ctrl.role, node.role, agent.role) == ("controller", "node", "agent")
    assert ctrl.log_format == node.log_format == agent.log_format == "json"
    # extraArgs come last and win over the chart's own flags
    assert (ctrl.default_size, node.max_volumes, ctrl.log_level, agent.log_level) == ("2Gi", 64, "debug", "info")
    assert ctrl.storage_nodes == "/etc/lvm-iscsi-csi/storage-nodes.yaml" and not ctrl.storage_node_label
    assert ctrl.journal_namespace == NAMESPACE and not ctrl.journal_dir
    assert agent.config == "/etc/lvm-iscsi-csi/agent.yaml"
    assert ctrl.tls_dir == agent.tls_dir == node.tls_dir == TLS_DIR
    # Agents and node plugins ask the controller's signer; the controller signs for the chart's own accounts
    # and DaemonSets, and issues from the CA Secret mounted at --ca-dir.
    assert agent.csr_signer == node.csr_signer == ctrl.csr_signer == "lvm-iscsi.csi.dev/identity"
    assert agent.ca_file == node.ca_file == ctrl.ca_file == "/etc/lvm-iscsi-csi/ca.crt"
    assert ctrl.ca_dir == "/etc/lvm-iscsi-csi/ca" and ctrl.signer_namespace == NAMESPACE
    assert ctrl.certificate_hours == values("multi-zone")["tls"]["certificateLifetimeHours"]
    accounts = {o["spec"]["template"]["spec"]["serviceAccountName"]: o["metadata"]["name"]
                for o in objs if o["kind"] == "DaemonSet"}
    assert accounts == {ctrl.agent_service_account: ctrl.agent_daemonset,
                        ctrl.node_service_account: ctrl.node_daemonset}
    assert ctrl.agent_daemonset.endswith("-agent") and ctrl.node_daemonset.endswith("-node")
    assert ctrl.cluster_id == agent.cluster_id == "prod-eu1"

    controller = ControllerConfig.build(driver_name=ctrl.driver_name, cluster_id=ctrl.cluster_id,
                                        storage_nodes_file=str(tmp_path / "storage-nodes.yaml"), tls_dir=ctrl.tls_dir,
                                        default_size=ctrl.default_size,
                                        journal_namespace=ctrl.journal_namespace)
    # Without a static list (the default): discovery by the agents' own node selector, same port.
    found = parse(one(rendered(), "Deployment", "-controller"), "driver")
    agent_ds = one(rendered(), "DaemonSet", "-agent")
    selector = agent_ds["spec"]["template"]["spec"]["nodeSelector"]
    assert found.storage_node_label == ",".join(sorted(f"{k}={v}" for k, v in selector.items()))
    assert "node-restriction.kubernetes.io/lvm-iscsi-storage-node=true" in found.storage_node_label
    assert not found.storage_nodes and found.agent_port == int(parse(agent_ds, "agent").listen.rsplit(":", 1)[1])
    assert [(n.name, n.address, n.zone) for n in controller.storage_nodes] == [
        (n["name"], n["address"], n["zone"]) for n in values("multi-zone")["storageNodes"]]
    # agent.portalCidr: the agent finds its portal among the host's addresses (recorded `ip -j addr show`)
    from csi.storage import netaddr
    recorded_ip = netaddr.parse_ip_addr((Path(__file__).parent / "recorded" / "ip_addr.json").read_text())
    monkeypatch.setattr(netaddr, "host_addresses", lambda: recorded_ip)
    agent_config = AgentConfig.build(node_name=agent.node_name, listen=agent.listen, portals=agent.portal or [],
                                     portal_cidrs=agent.portal_cidr or [], portal_port=agent.portal_port,
                                     state_dir=agent.state_dir, cluster_id=agent.cluster_id, tls_dir=agent.tls_dir,
                                     config_file=str(tmp_path / "agent.yaml"))
    assert [str(p) for p in agent_config.portals] == ["10.20.0.11:3260"]
    assert [(p.name, p.vg, p.thin_pool, p.overprovision_ratio) for p in agent_config.pools] == [
        ("fast", "vg-nvme", "pool0", 2.5), ("bulk", "vg-hdd", "", 1.0)]
    assert agent_config.devices == ("/dev/disk/by-id/nvme-*", "/dev/sdb") and agent_config.wipe_thick is False


def test_every_rendered_storage_class_is_accepted_by_the_driver():
    """The parameters the chart writes (extraParameters included) are the ones CreateVolume accepts."""
    from csi import capabilities

    for value_set in VALUE_SETS:
        for sc in (o for o in rendered(value_set) if o["kind"] == "StorageClass"):
            capabilities.parse_params(sc["parameters"])
    fast = one(rendered("multi-zone"), "StorageClass", "fast")
    assert capabilities.parse_params(fast["parameters"]).mkfs_options == "-m bigtime=1,inobtcount=1 -i nrext64=1"
    mirrored = capabilities.parse_params(one(rendered("multi-zone"), "StorageClass", "fast-mirrored")["parameters"])
    assert (mirrored.replicas, mirrored.replica_zones) == (2, ("eu-1b",))
    refused = template("--set", "storageClasses[0].name=x,storageClasses[0].pool=p,storageClasses[0].type=thin,"
                       "storageClasses[0].replicas=3", check=False)
    assert refused.returncode != 0 and "replicas" in refused.stderr, refused.stderr


def test_extra_args_reach_every_container_after_the_charts_own():
    """extraArgs for flags the chart does not model: the driver containers and each sidecar, livenessprobe in both
    pods; appended last, so that for a flag the chart sets too the operator's wins."""
    vals = values("multi-zone")
    expected = {
        ("Deployment", "driver"): vals["controller"]["extraArgs"],
        ("DaemonSet-node", "driver"): vals["node"]["extraArgs"],
        ("DaemonSet-agent", "agent"): vals["agent"]["extraArgs"],
        ("Deployment", "csi-provisioner"): vals["sidecars"]["provisioner"]["extraArgs"],
        ("Deployment", "csi-attacher"): vals["sidecars"]["attacher"]["extraArgs"],
        ("Deployment", "csi-snapshotter"): vals["sidecars"]["snapshotter"]["extraArgs"],
        ("Deployment", "csi-resizer"): vals["sidecars"]["resizer"]["extraArgs"],
        ("Deployment", "liveness-probe"): vals["sidecars"]["livenessProbe"]["extraArgs"],
        ("DaemonSet-node", "liveness-probe"): vals["sidecars"]["livenessProbe"]["extraArgs"],
        ("DaemonSet-node", "node-driver-registrar"): vals["sidecars"]["nodeDriverRegistrar"]["extraArgs"],
    }
    seen = set()
    for w in (o for o in rendered("multi-zone") if o["kind"] in ("Deployment", "DaemonSet")):
        kind = w["kind"] if w["kind"] == "Deployment" else f"DaemonSet-{w['metadata']['name'].rsplit('-', 1)[1]}"
        for name, c in containers(w).items():
            extra = expected[(kind, name)]
            assert extra and c["args"][-len(extra):] == extra, (kind, name, c["args"])
            seen.add((kind, name))
    assert seen == set(expected)
    # none by default: every container's args end with the chart's own last flag
    default = values()
    assert not [k for k in ("controller", "node", "agent") if default[k]["extraArgs"]]
    assert not [k for k, v in default["sidecars"].items() if isinstance(v, dict) and v["extraArgs"]]
    for w in (o for o in rendered() if o["kind"] in ("Deployment", "DaemonSet")):
        for name, c in containers(w).items():
            assert c["args"][-1].split("=")[0] in ("--log-format", "--default-fstype", "--timeout",
                                                   "--extra-create-metadata", "--handle-volume-inuse-error",
                                                   "--probe-timeout", "--http-endpoint"), (name, c["args"][-1])


def test_log_format_reaches_every_driver_process():
    for value_set, fmt in (("default", "text"), ("multi-zone", "json")):
        for w in (o for o in rendered(value_set) if o["kind"] in ("Deployment", "DaemonSet")):
            c = containers(w)["agent" if w["metadata"]["name"].endswith("-agent") else "driver"]
            assert f"--log-format={fmt}" in c["args"], (value_set, w["metadata"]["name"])


def test_sidecar_images_are_pinned_released_versions():
    """The sidecars at released versions; the driver's own image at the chart's appVersion, which between two
    releases is the next one's -dev (deploy/releases.txt)."""
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for value_set in VALUE_SETS:
        for w in (o for o in rendered(value_set) if o["kind"] in ("Deployment", "DaemonSet")):
            for c in containers(w).values():
                image = c["image"]
                if c["name"] in ("driver", "agent") and "@sha256:" not in image:
                    assert image.split("/")[-1] == f"lvm-iscsi-csi:{app_version}", image
                    continue
                pinned = re.search(r":v?\d+\.\d+\.\d+$", image) or "@sha256:" in image
                assert pinned and not image.endswith(":latest"), image


# ---------------------------------------------------------------------------------------------- cluster objects

def test_csidriver_storage_classes_and_snapshot_class():
    objs = rendered()
    driver = one(objs, "CSIDriver")
    assert driver["metadata"]["name"] == "lvm-iscsi.csi.dev"
    assert driver["spec"] == {"attachRequired": True, "podInfoOnMount": False, "fsGroupPolicy": "File",
                              "volumeLifecycleModes": ["Persistent"], "storageCapacity": True,
                              "requiresRepublish": False}
    classes = {o["metadata"]["name"]: o for o in objs if o["kind"] == "StorageClass"}
    assert sorted(classes) == ["lvm-iscsi-block", "lvm-iscsi-thick", "lvm-iscsi-thin", "lvm-iscsi-thin-xfs"]
    defaults = [n for n, o in classes.items()
                if o["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"]
    assert defaults == [], "a second default class on a cluster that has one: none unless the values ask"
    # exactly the parameters of earlier releases: a StorageClass's parameters cannot change, so one more (replicas:
    # "1", the driver's default) would fail every upgrade
    assert classes["lvm-iscsi-thin"]["parameters"] == {"pool": "thin", "type": "thin",
                                                       "csi.storage.k8s.io/fstype": "ext4", "mutualChap": "false"}
    assert classes["lvm-iscsi-thin-xfs"]["parameters"]["csi.storage.k8s.io/fstype"] == "xfs"
    assert "csi.storage.k8s.io/fstype" not in classes["lvm-iscsi-block"]["parameters"]
    assert classes["lvm-iscsi-thick"]["parameters"] == {"pool": "thick", "type": "thick",
                                                        "csi.storage.k8s.io/fstype": "ext4", "mutualChap": "false",
                                                        "wipe": "true"}
    for sc in classes.values():
        assert sc["provisioner"] == "lvm-iscsi.csi.dev"
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer" and sc["allowVolumeExpansion"] is True
    vsc = one(objs, "VolumeSnapshotClass")
    assert vsc["driver"] == "lvm-iscsi.csi.dev" and vsc["deletionPolicy"] == "Delete"


def test_install_notes_say_how_to_check_the_workers_zones(tmp_path):
    """Helm cannot see node labels: the notes say where a worker's zone comes from, how to check and fix it, and
    what happens without one; with node.zone set, they catch storage nodes that no worker can reach."""
    text = render_notes(tmp_path / "a", *values_args("multi-zone"))
    for part in ("kubectl get nodes -L topology.kubernetes.io/zone", "stay Pending",
                 "zone of the storage nodes it should use (eu-1a, eu-1b, eu-1c)",
                 "kubectl label node <worker> topology.kubernetes.io/zone=<zone>", "lvm-iscsi-csi-node pod"):
        assert part in text, part
    # custom-selectors: node.zone matches the one storage node's zone: nothing to check, nothing to warn
    text = render_notes(tmp_path / "b", *values_args("custom-selectors"))
    assert "kubectl get nodes -L" not in text and "WARNING: node.zone" not in text
    text = render_notes(tmp_path / "c", *values_args("multi-zone"), "--set", "node.zone=eu-1b")
    assert "WARNING: node.zone=eu-1b puts every worker in zone eu-1b, but storage nodes are in eu-1a, eu-1c" in text


def test_a_default_storage_class_only_when_asked(tmp_path):
    def defaults(objs):
        return [o["metadata"]["name"] for o in objs if o["kind"] == "StorageClass" and o["metadata"].get(
            "annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"]

    assert defaults(rendered()) == []
    asked = '[{"name":"lvm-iscsi-thin","pool":"thin","type":"thin","fsType":"ext4","isDefault":true}]'
    assert defaults(objects(template("--set-json", f"storageClasses={asked}").stdout)) == ["lvm-iscsi-thin"]
    assert defaults(rendered("multi-zone")) == ["fast"]
    assert "claims name one (storageClassName: lvm-iscsi-thin)" in render_notes(tmp_path / "a")
    notes = render_notes(tmp_path / "b", *values_args("multi-zone"))
    assert "StorageClass fast is the cluster's default class" in notes


def test_zones_and_storage_nodes_reach_the_classes_and_the_controller():
    objs = rendered("multi-zone")
    classes = {o["metadata"]["name"]: o for o in objs if o["kind"] == "StorageClass"}
    assert "allowedTopologies" not in classes["fast"]
    assert classes["bulk-eu-1a-1b"]["allowedTopologies"] == [{"matchLabelExpressions": [
        {"key": "topology.lvm-iscsi.csi.dev/zone", "values": ["eu-1a", "eu-1b"]}]}]
    assert classes["fast-eu-1a"]["reclaimPolicy"] == "Retain"
    assert classes["bulk-eu-1a-1b"]["allowVolumeExpansion"] is False
    assert classes["fast"]["parameters"]["mutualChap"] == "true" and classes["fast"]["mountOptions"] == ["noatime"]
    nodes = yaml.safe_load(one(objs, "ConfigMap", "-controller")["data"]["storage-nodes.yaml"])
    assert nodes == {"storageNodes": values("multi-zone")["storageNodes"]}
    assert one(objs, "Deployment")["spec"]["replicas"] == 2
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == one(objs, "Deployment")["spec"]["selector"]["matchLabels"]
    # Two controller replicas by default (HA), so a PodDisruptionBudget; no static list, so no ConfigMap.
    default = rendered()
    assert one(default, "Deployment")["spec"]["replicas"] == 2 and one(default, "PodDisruptionBudget")
    # The two replicas of a revision on two nodes, counted apart from the old revision's (a rollout's surge pod);
    # a node the pod cannot go to (its taints) is no domain. A constraint given replaces the default one.
    spread = one(default, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    selector = one(default, "Deployment")["spec"]["selector"]["matchLabels"]
    assert spread == [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
                       "nodeTaintsPolicy": "Honor", "matchLabelKeys": ["pod-template-hash"],
                       "labelSelector": {"matchLabels": selector}}]
    custom = one(rendered("custom-selectors"), "Deployment")["spec"]["template"]["spec"]
    assert custom["topologySpreadConstraints"] == values("custom-selectors")["controller"]["topologySpreadConstraints"]
    assert not [o for o in default if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-controller")]


def test_custom_selectors_driver_name_kubelet_dir_and_digests():
    objs = rendered("custom-selectors")
    vals = values("custom-selectors")
    node = one(objs, "DaemonSet", "-node")
    spec = node["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == vals["node"]["nodeSelector"] and spec["tolerations"] == vals["node"]["tolerations"]
    assert "priorityClassName" not in spec
    ctrl = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert ctrl["affinity"] == vals["controller"]["affinity"]
    assert ctrl["tolerations"] == vals["controller"]["tolerations"]
    assert ctrl["imagePullSecrets"] == [{"name": "registry-credentials"}]
    images = {c["name"]: c["image"] for c in ctrl["containers"]}
    assert images["driver"] == f"{vals['image']['repository']}@{vals['image']['digest']}"
    assert images["csi-provisioner"].endswith("@" + vals["sidecars"]["provisioner"]["image"]["digest"])
    driver = containers(node)["driver"]
    assert "--kubelet-dir=/var/lib/k0s/kubelet" in driver["args"] and "--zone=hall-1" in driver["args"]
    assert mounts(driver)["/var/lib/k0s/kubelet"]["mountPropagation"] == "Bidirectional"
    sock = "/var/lib/k0s/kubelet/plugins/iscsi.storage.example.com/csi.sock"
    assert f"--kubelet-registration-path={sock}" in containers(node)["node-driver-registrar"]["args"]
    assert one(objs, "CSIDriver")["metadata"]["name"] == "iscsi.storage.example.com"
    assert {o["provisioner"] for o in objs if o["kind"] == "StorageClass"} == {"iscsi.storage.example.com"}
    assert not [o for o in objs if o["kind"] == "VolumeSnapshotClass"]


EXPECTED_RULES = {
    "provisioner": {("", "persistentvolumes"): "create delete get list patch watch",
                    ("", "persistentvolumeclaims"): "get list update watch",
                    ("storage.k8s.io", "storageclasses"): "get list watch",
                    ("", "events"): "create list patch update watch",
                    ("snapshot.storage.k8s.io", "volumesnapshots"): "get list update watch",
                    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): "get list",
                    ("storage.k8s.io", "csinodes"): "get list watch",
                    ("", "nodes"): "get list watch",
                    ("storage.k8s.io", "volumeattachments"): "get list watch"},
    "attacher": {("", "persistentvolumes"): "get list patch watch",
                 ("storage.k8s.io", "csinodes"): "get list watch",
                 ("storage.k8s.io", "volumeattachments"): "get list patch watch",
                 ("storage.k8s.io", "volumeattachments/status"): "patch"},
    "snapshotter": {("", "events"): "create list patch update watch",
                    ("snapshot.storage.k8s.io", "volumesnapshotclasses"): "get list watch",
                    ("snapshot.storage.k8s.io", "volumesnapshotcontents"): "get list patch update watch",
                    ("snapshot.storage.k8s.io", "volumesnapshotcontents/status"): "patch update"},
    "resizer": {("", "persistentvolumes"): "get list patch watch",
                ("", "persistentvolumeclaims"): "get list watch",
                ("", "persistentvolumeclaims/status"): "patch",
                ("", "events"): "create list patch update watch"},
    "node": {("", "nodes"): "get",
             ("certificates.k8s.io", "certificatesigningrequests"): "create get"},
    "agent": {("certificates.k8s.io", "certificatesigningrequests"): "create get"},
    "signer": {("certificates.k8s.io", "certificatesigningrequests"): "get list watch",
               ("certificates.k8s.io", "certificatesigningrequests/approval"): "update",
               ("certificates.k8s.io", "certificatesigningrequests/status"): "update",
               ("certificates.k8s.io", "signers", "lvm-iscsi.csi.dev/identity"): "approve sign"},
    "controller": {("coordination.k8s.io", "leases"): "create delete get list update watch",
                   ("storage.k8s.io", "csistoragecapacities"): "create delete get list patch update watch",
                   ("", "pods"): "get",
                   ("apps", "replicasets"): "get",
                   ("", "configmaps"): "create delete get list update"},
}


def _rules(role: dict) -> dict:
    """{(group, resource[, resourceName]): "verbs"}: a rule narrowed to names says which."""
    out = {}
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in rule.get("resourceNames") or [None]:
                    key = (group, resource) if name is None else (group, resource, name)
                    assert key not in out, key
                    out[key] = " ".join(sorted(rule["verbs"]))
    return out


def test_rbac_grants_each_role_exactly_what_it_needs():
    objs = rendered()
    roles = {o["metadata"]["name"].removeprefix(RELEASE + "-"): o for o in objs if o["kind"] in ("ClusterRole", "Role")}
    assert {k: _rules(v) for k, v in roles.items()} == EXPECTED_RULES
    assert one(objs, "Role")["metadata"]["namespace"] == NAMESPACE
    for o in objs:
        if o["kind"] in ("ClusterRole", "Role"):
            text = json.dumps(o["rules"])
            assert '"*"' not in text and "secrets" not in text, o["metadata"]["name"]
    bindings = {o["metadata"]["name"].removeprefix(RELEASE + "-"): o
                for o in objs if o["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    for name, b in bindings.items():
        assert b["roleRef"]["name"] == f"{RELEASE}-{name}"
        sa = name if name in ("node", "agent") else "controller"
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-{sa}", "namespace": NAMESPACE}]
    # No account's token is mounted by default: each pod mounts it into the containers that call the API only.
    assert all(o["automountServiceAccountToken"] is False for o in objs if o["kind"] == "ServiceAccount")
    # Approving and signing the driver's certificates is the controller's alone, for its own signer only.
    signers = [o["metadata"]["name"] for o in objs if o["kind"] in ("ClusterRole", "Role")
               and any("signers" in r["resources"] or any(x.endswith(("/approval", "/status")) and
                                                          x.startswith("certificate") for x in r["resources"])
                       for r in o["rules"])]
    assert signers == [f"{RELEASE}-signer"]


def test_controller_network_policy_admits_only_the_health_ports():
    objs = rendered()
    policy = one(objs, "NetworkPolicy")
    dep = one(objs, "Deployment")
    assert policy["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    ports = sorted(p["port"] for p in policy["spec"]["ingress"][0]["ports"])
    declared = sorted(p["containerPort"] for c in containers(dep).values() for p in c.get("ports", []))
    assert ports == declared and policy["spec"]["policyTypes"] == ["Ingress"]


# ---------------------------------------------------------------------------------------------- certificates

def _ca_files(objs: list[dict]) -> dict[str, bytes]:
    """The generated CA as the pods see it: the Secret's tls.crt and tls.key, the ConfigMap's ca.crt."""
    secret = one(objs, "Secret", "-ca")
    bundle = one(objs, "ConfigMap", "-ca")
    assert secret["type"] == "kubernetes.io/tls" and sorted(secret["data"]) == ["tls.crt", "tls.key"]
    return {"ca.crt": base64.b64decode(secret["data"]["tls.crt"]), "ca.key": base64.b64decode(secret["data"]["tls.key"]),
            "bundle": bundle["data"]["ca.crt"].encode()}


def _mounted(objs: list[dict], tmp_path: Path, ca_crt: bytes, ca_key: bytes, bundle: bytes) -> Path:
    """The controller's /etc/lvm-iscsi-csi as its projected volume lays it out, under tmp_path: the CA Secret's
    items at the paths the chart gives them, the bundle; its args then point into it."""
    root = tmp_path / "etc-lvm-iscsi-csi"
    sources = volumes(one(objs, "Deployment", "-controller"))["config"]["projected"]["sources"]
    content = {("secret", "tls.crt"): ca_crt, ("secret", "tls.key"): ca_key, ("configMap", "ca.crt"): bundle}
    for source in sources:
        (kind, spec), = source.items()
        for item in spec["items"]:
            if (kind, item["key"]) in content:
                (root / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                (root / item["path"]).write_bytes(content[kind, item["key"]])
    return root


def _controller_issues_and_peers_connect(objs: list[dict], root: Path, tmp_path: Path) -> None:
    """The controller started with the rendered flags (paths under root) issues its own certificate from the
    mounted CA; certificates the signer would issue (pki.issue) to two agents then make mutual TLS work both
    ways the driver needs: controller -> agent, and agent -> agent (a copy across storage nodes), each server
    checked by its node's name."""
    import grpc

    from csi import cli, peers, pki
    from csi.server import TlsFiles

    args = [a.replace("/etc/lvm-iscsi-csi", str(root)).replace(TLS_DIR, str(tmp_path / "controller-tls"))
            for a in containers(one(objs, "Deployment", "-controller"))["driver"]["args"]]
    a = cli.parser().parse_args([x for x in args if not x.startswith("--csr-signer")])   # no API server here
    cli._controller_certificates(a, Path(a.tls_dir))
    controller = TlsFiles(Path(a.tls_dir))
    ca_key, ca_cert = pki.load_ca(Path(a.ca_dir))
    agents = {}
    for node in ("storage-1", "storage-2"):
        key = pki.new_key()
        d = tmp_path / node
        d.mkdir()
        (d / "tls.key").write_bytes(pki.key_pem(key))
        (d / "tls.crt").write_bytes(pki.cert_pem(pki.issue(ca_key, ca_cert, key.public_key(), peers.AGENT, node)))
        (d / "ca.crt").write_bytes((root / "ca.crt").read_bytes())
        agents[node] = TlsFiles(d)
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}),))
    port = server.add_secure_port("127.0.0.1:0", agents["storage-1"].server_credentials())
    server.start()
    try:
        def call(client: TlsFiles, node: str) -> bytes:
            name = peers.dns_name(peers.AGENT, node)
            with grpc.secure_channel(f"127.0.0.1:{port}", client.channel_credentials(),
                                     options=[("grpc.ssl_target_name_override", name)]) as channel:
                return channel.unary_unary("/test.Echo/Ping")(b"ping", timeout=10)

        assert call(controller, "storage-1") == b"ping"
        assert call(agents["storage-2"], "storage-1") == b"ping"     # an agent's certificate is a client's too
        with pytest.raises(grpc.RpcError):
            call(controller, "storage-2")        # storage-1 cannot pose as storage-2
    finally:
        server.stop(None)


def test_the_generated_ca_is_kept_for_the_controller_and_trusted_by_every_pod(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    objs = rendered()
    files = _ca_files(objs)
    ca = x509.load_pem_x509_certificate(files["ca.crt"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    days = (ca.not_valid_after_utc - ca.not_valid_before_utc) / datetime.timedelta(days=1)
    assert abs(days - values()["tls"]["validityDays"]) <= 1
    assert files["bundle"].strip() == files["ca.crt"].strip()
    # the key reaches the controller only; the bundle every driver pod; all roll when the CA changes
    workloads = [o for o in objs if o["kind"] in ("Deployment", "DaemonSet")]
    holders = [w["metadata"]["name"] for w in workloads
               if any(s.get("secret", {}).get("name") == f"{RELEASE}-ca"
                      for v in volumes(w).values() for s in v.get("projected", {}).get("sources", []))]
    assert holders == [f"{RELEASE}-controller"]
    for w in workloads:
        sources = [s for v in volumes(w).values() for s in v.get("projected", {}).get("sources", [])]
        assert {"configMap": {"name": f"{RELEASE}-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}} in sources
    assert len({w["spec"]["template"]["metadata"]["annotations"]["checksum/ca"] for w in workloads}) == 1
    assert not [o for o in objs if o["kind"] == "Secret" and o["metadata"]["name"] != f"{RELEASE}-ca"]
    _controller_issues_and_peers_connect(objs, _mounted(objs, tmp_path, files["ca.crt"], files["ca.key"],
                                                         files["bundle"]), tmp_path)


def test_your_own_ca_is_mounted_and_nothing_generated():
    objs = rendered("own-ca")
    assert not [o for o in objs if o["kind"] == "Secret"]
    assert not [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{RELEASE}-ca"]
    dep = one(objs, "Deployment", "-controller")
    sources = volumes(dep)["config"]["projected"]["sources"]
    assert [s["secret"]["name"] for s in sources if "secret" in s] == ["company-ca"]
    for w in (o for o in objs if o["kind"] == "DaemonSet"):
        assert not [s for v in volumes(w).values() for s in v.get("projected", {}).get("sources", []) if "secret" in s]


class FakeApiServer:
    """Just enough of the Kubernetes API for helm's `lookup` of Secrets: discovery, GET, and empty lists."""

    def __init__(self):
        self.secrets: dict[tuple[str, str], dict] = {}
        self.requests: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = urlparse(self.path).path
                outer.requests.append(path)
                parts = path.strip("/").split("/")
                if path == "/version":
                    return self._send(200, {"major": "1", "minor": "37", "gitVersion": "v1.37.0"})
                if path == "/api":
                    return self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
                if path == "/apis":
                    return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
                if path == "/api/v1":
                    return self._send(200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
                         "verbs": ["get", "list"]}]})
                if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
                    if (parts[3], parts[5]) in outer.secrets:
                        return self._send(200, outer.secrets[(parts[3], parts[5])])
                if len(parts) == 5 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
                    return self._send(200, {"kind": "SecretList", "apiVersion": "v1", "metadata": {}, "items": []})
                return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.server.server_address[1]}"}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": NAMESPACE}}]}))
        path.chmod(0o600)
        return path

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_helm_upgrade_keeps_the_ca_through_lookup(tmp_path):
    """`helm template --dry-run=server --is-upgrade` runs the templates as `helm upgrade` does, lookup included,
    against a fake API server that holds the CA Secret of the first install."""
    api = FakeApiServer()
    secret = f"{RELEASE}-ca"
    try:
        kubeconfig = str(api.kubeconfig(tmp_path))

        def render(*extra: str) -> list[dict]:
            return objects(template("--dry-run=server", "--kubeconfig", kubeconfig, *extra).stdout)

        def checksums(objs: list[dict]) -> set[str]:
            return {o["spec"]["template"]["metadata"]["annotations"]["checksum/ca"] for o in objs
                    if o["kind"] in ("Deployment", "DaemonSet")}

        install = render()
        assert f"/api/v1/namespaces/{NAMESPACE}/secrets/{secret}" in api.requests
        api.secrets[(NAMESPACE, secret)] = one(install, "Secret", "-ca")
        upgrade = render("--is-upgrade")
        assert _ca_files(upgrade) == _ca_files(install)
        assert checksums(upgrade) == checksums(install) and len(checksums(install)) == 1
        # Without lookup (plain helm template) every render makes a new CA: that is what lookup prevents.
        assert _ca_files(rendered())["ca.crt"] != _ca_files(install)["ca.crt"]
        # The Secret gone (deleted to rotate the CA): a new CA, and every pod rolls to get a new certificate.
        api.secrets.clear()
        rotated = render("--is-upgrade")
        assert _ca_files(rotated)["ca.crt"] != _ca_files(install)["ca.crt"]
        assert checksums(rotated) != checksums(install) and len(checksums(rotated)) == 1
    finally:
        api.close()


def render_notes(tmp_path: Path, *args: str, snapshot_api: bool = True) -> str:
    """NOTES.txt as `helm install` prints it. `helm template` leaves NOTES.txt out: render it as the data of a
    ConfigMap in a copy of the chart."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "NOTES.txt").unlink()
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n"
        + "".join(f"    {line}\n" for line in notes.splitlines()))
    r = helm("template", RELEASE, str(chart), "--namespace", NAMESPACE, "--kube-version", RENDER_KUBE_VERSION,
             *(SNAPSHOT_API if snapshot_api else ()), *args, "--show-only", "templates/zz-notes.yaml")
    return yaml.safe_load(r.stdout)["data"]["notes"]


@pytest.mark.parametrize("value_set", ["default", "multi-zone"])
def test_install_notes_render(tmp_path, value_set):
    text = render_notes(tmp_path, *values_args(value_set))
    assert ("discovers them by the same labels" in text) == (value_set == "default")
    assert ("agent.devices is empty" in text) == (value_set == "default")
    assert f"--cluster-id {values(value_set)['clusterId']}" in text and f"--journal-namespace {NAMESPACE}" in text
    assert "node-restriction.kubernetes.io/lvm-iscsi-storage-node=true" in text


# ---------------------------------------------------------------------------------------------- README

def _readme_yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", (CHART / "README.md").read_text(), re.S)


def test_readme_examples_are_valid(tmp_path):
    """Kubernetes objects in the README validate (snapshot objects against the CRDs); value snippets render."""
    blocks = _readme_yaml_blocks()
    assert len(blocks) >= 5
    kinds = []
    for i, block in enumerate(blocks):
        docs = objects(block)
        if all("apiVersion" in d for d in docs):
            for d in docs:
                kinds.append(d["kind"])
                errors = (_validate_snapshot_object(d) if d["apiVersion"].startswith(SNAPSHOT_GROUP)
                          else [e for e in [_validate_k8s(d, RENDER_KUBE_VERSION)] if e])
                assert not errors, f"README block {i + 1}: {errors}"
        else:
            path = tmp_path / f"readme-{i}.yaml"
            path.write_text(block)
            template("-f", str(path))
    assert {"StorageClass", "PersistentVolumeClaim", "VolumeSnapshot"} <= set(kinds)


KUBECTL_SHIM = r"""#!/usr/bin/env python3
# Stands for the cluster of the READMEs' recipes, for exactly these (anything else fails): `kubectl -n NS create
# secret tls NAME --cert=F --key=F`, `kubectl -n NS create configmap NAME --from-file=F`, `kubectl apply -f F`;
# writes each object kubectl would create to $RECIPE_OUT/<kind>-<name>.json.
import argparse, base64, json, os, sys
p = argparse.ArgumentParser(prog="kubectl")
p.add_argument("-n", "--namespace")
sub = p.add_subparsers(dest="verb", required=True)
apply = sub.add_parser("apply")
apply.add_argument("-f", required=True)
create = sub.add_parser("create").add_subparsers(dest="kind", required=True)
tls = create.add_parser("secret").add_subparsers(dest="type", required=True).add_parser("tls")
tls.add_argument("name")
tls.add_argument("--cert", required=True)
tls.add_argument("--key", required=True)
cm = create.add_parser("configmap")
cm.add_argument("name")
cm.add_argument("--from-file", required=True)
a = p.parse_args()
if a.verb == "apply":
    open(a.f).read()
    sys.exit(0)
if not a.namespace:
    sys.exit("kubectl shim: the recipe names no namespace")
meta = {"name": a.name, "namespace": a.namespace}
if a.kind == "secret":
    data = {k: base64.b64encode(open(f, "rb").read()).decode() for k, f in (("tls.crt", a.cert), ("tls.key", a.key))}
    obj = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": meta, "data": data}
else:
    obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta,
           "data": {os.path.basename(a.from_file): open(a.from_file).read()}}
open(os.path.join(os.environ["RECIPE_OUT"], f"{obj['kind']}-{a.name}.json"), "w").write(json.dumps(obj))
"""

HELM_SHIM = """#!/usr/bin/env bash
# `helm install ARGS...` of the README's recipe, rendered with `helm template ARGS...` (no cluster).
set -euo pipefail
[ "$1" = install ] || { echo "helm shim: only install" >&2; exit 2; }
shift
exec "$REAL_HELM" template "$@" --kube-version {kube} > "$RECIPE_OUT/rendered.yaml"
"""


def _run_recipe(readme: Path, heading: str, tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    """Runs the first bash block after `heading` in a README as it stands, in a fresh directory (with the repo's
    deploy/ and a my-values.yaml), openssl for real, kubectl and `helm install` through the shims. The directory
    and the objects kubectl would have created, by kind."""
    import json as _json

    section = readme.read_text().split(heading, 1)[1]
    script = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    work = tmp_path / "work"
    (work / "bin").mkdir(parents=True)
    (work / "deploy").symlink_to(ROOT / "deploy")
    (work / "my-values.yaml").write_text("clusterId: recipe\n")
    (work / "bin" / "kubectl").write_text(KUBECTL_SHIM)
    (work / "bin" / "helm").write_text(HELM_SHIM.replace("{kube}", RENDER_KUBE_VERSION))
    for shim in ("kubectl", "helm"):
        (work / "bin" / shim).chmod(0o755)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}",
                                         "RECIPE_OUT": str(work), "REAL_HELM": helm_binary()})
    assert r.returncode == 0, f"the recipe of {readme} failed:\n{script}\n{r.stderr}"
    made: dict[str, dict] = {}
    for f in sorted(work.glob("*-*.json")):
        obj = _json.loads(f.read_text())
        assert obj["kind"] not in made, f"the recipe makes two {obj['kind']}s"
        made[obj["kind"]] = obj
    return work, made


def test_the_readme_recipe_for_your_own_ca_works_as_written(tmp_path):
    """The commands of the chart README's "Your own CA", run as written, then: the chart renders with the CA's
    certificate in the pods' bundle and the Secret mounted into the controller, and the controller, started with
    the rendered flags on those files, issues certificates that connect controller to agent and agent to agent."""
    work, made = _run_recipe(CHART / "README.md", "### Your own CA", tmp_path)
    secret = made.pop("Secret")
    assert not made, made
    objs = objects((work / "rendered.yaml").read_text())
    dep = one(objs, "Deployment", "-controller")
    assert secret["metadata"]["namespace"] == dep["metadata"]["namespace"] == NAMESPACE
    assert not [o for o in objs if o["kind"] == "Secret"]          # no CA of the chart's
    mounted = [s["secret"]["name"] for s in volumes(dep)["config"]["projected"]["sources"] if "secret" in s]
    assert mounted == [secret["metadata"]["name"]]
    bundle = one(objs, "ConfigMap", "-ca")["data"]["ca.crt"].encode()
    assert bundle.strip() == (work / "ca.crt").read_bytes().strip()
    root = _mounted(objs, tmp_path, base64.b64decode(secret["data"]["tls.crt"]),
                    base64.b64decode(secret["data"]["tls.key"]), bundle)
    _controller_issues_and_peers_connect(objs, root, tmp_path)


def test_the_plain_manifests_recipe_for_the_ca_works_as_written(tmp_path):
    """deploy/manifests/README.md's commands, run as written: they make the Secret and the ConfigMap the plain
    manifests mount, under those names, in that namespace, and the controller issues from them."""
    _, made = _run_recipe(MANIFESTS / "README.md", "## 1. The CA", tmp_path)
    assert sorted(made) == ["ConfigMap", "Secret"]
    docs = [d for d in objects((MANIFESTS / "lvm-iscsi-csi.yaml").read_text())]
    dep = one(docs, "Deployment", "-controller")
    sources = [s for v in volumes(dep).values() for s in v.get("projected", {}).get("sources", [])]
    assert [s["secret"]["name"] for s in sources if "secret" in s] == [made["Secret"]["metadata"]["name"]]
    assert made["ConfigMap"]["metadata"]["name"] == f"{RELEASE}-ca" and "ca.crt" in made["ConfigMap"]["data"]
    for obj in made.values():
        assert obj["metadata"]["namespace"] == dep["metadata"]["namespace"]
    root = _mounted(docs, tmp_path, base64.b64decode(made["Secret"]["data"]["tls.crt"]),
                    base64.b64decode(made["Secret"]["data"]["tls.key"]), made["ConfigMap"]["data"]["ca.crt"].encode())
    _controller_issues_and_peers_connect(docs, root, tmp_path)


def test_readme_documents_every_storage_class_parameter_and_value():
    text = (CHART / "README.md").read_text()
    for parameter in ("`pool`", "`type`", "`csi.storage.k8s.io/fstype`", "`mutualChap`", "`wipe`", "`mkfsOptions`"):
        assert parameter in text
    for heading in ("## Install", "## Upgrade", "## Uninstall", "## Snapshots", "### Workers: open-iscsi",
                    "target.service", "### Security scan: accepted findings"):
        assert heading in text, heading


# ---------------------------------------------------------------------------------------------- plain manifests

def test_plain_manifests_match_the_chart(tmp_path):
    render = ROOT / "scripts" / "render-manifests"
    helm_binary()
    r = subprocess.run([str(render), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HELM": helm_binary()})
    assert r.returncode == 0, r.stderr
    fresh = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(str(p.relative_to(MANIFESTS)) for p in MANIFESTS.rglob("*")
                       if p.suffix in (".yaml", ".yml", ".json"))
    assert fresh == committed, f"deploy/manifests has {committed}, the chart renders {fresh}"
    for name in fresh:
        assert (tmp_path / name).read_text() == (MANIFESTS / name).read_text(), (
            f"deploy/manifests/{name} drifted from the chart: run scripts/render-manifests")


def test_plain_manifests_apply_on_a_cluster_without_the_snapshot_crds():
    """`kubectl apply -f deploy/manifests/` (not recursive) holds no snapshot object; the VolumeSnapshotClass is
    in snapshots/, for clusters with the CRDs."""
    top = [d for p in sorted(MANIFESTS.glob("*.yaml")) for d in objects(p.read_text())]
    assert not [d for d in top if d["apiVersion"].startswith(SNAPSHOT_GROUP)]
    snapshots = [d for p in sorted((MANIFESTS / "snapshots").glob("*.yaml")) for d in objects(p.read_text())]
    assert [d["kind"] for d in snapshots] == ["VolumeSnapshotClass"]


def test_plain_manifests_are_valid_and_carry_no_private_key():
    docs = [d for p in sorted(MANIFESTS.rglob("*.yaml")) for d in objects(p.read_text())]
    assert docs[0]["kind"] == "Namespace"
    assert docs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    assert not [d for d in docs if d["kind"] == "Secret"]
    errors = [e for d in docs for e in ([_validate_k8s(d, RENDER_KUBE_VERSION)] if not d["apiVersion"].startswith(
        SNAPSHOT_GROUP) else _validate_snapshot_object(d)) if e]
    assert not errors, errors
    for d in docs:
        if d["kind"] != "Namespace" and d["kind"] not in ("CSIDriver", "StorageClass", "VolumeSnapshotClass",
                                                           "ClusterRole", "ClusterRoleBinding"):
            assert d["metadata"]["namespace"] == docs[0]["metadata"]["name"], d["metadata"]["name"]


# ---------------------------------------------------------------------------------------------- security scan

def checkov(directory: Path, framework: str) -> list[dict]:
    """checkov's failed checks, offline: --skip-download, and no other network use."""
    r = subprocess.run([checkov_binary(), "-d", str(directory), "--framework", framework, "--skip-download",
                        "--compact", "--quiet", "--output", "json"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"})
    assert r.returncode in (0, 1), f"checkov failed ({r.returncode}):\n{r.stderr[-3000:]}"
    reports = json.loads(r.stdout) if r.stdout.strip() else []
    reports = reports if isinstance(reports, list) else [reports]
    assert reports and all(rep.get("check_type") == framework for rep in reports), r.stdout[:2000]
    assert sum(rep["summary"]["passed"] for rep in reports) > 0, "checkov checked nothing"
    return [c for rep in reports for c in rep["results"]["failed_checks"]]


def _component(resource: str) -> str:
    # "DaemonSet.<ns>.<release>-agent" or "Pod.<ns>.<release>-node.<labels...>component-node"
    m = re.search(r"app\.kubernetes\.io/component-([a-z]+)$", resource) or re.search(r"-([a-z]+)$", resource)
    return m.group(1) if m else resource


def accepted_findings() -> set[tuple[str, str]]:
    text = (CHART / "README.md").read_text().split("### Security scan: accepted findings", 1)[1]
    out = set()
    for row in re.findall(r"^\| (CKV2?_[A-Z0-9_]+) \| ([^|]+) \|", text, re.M):
        check, where = row
        out |= {(check, w.strip()) for w in where.split(",")}
    return out


def test_checkov_findings_are_exactly_the_accepted_ones(tmp_path):
    (tmp_path / "chart.yaml").write_text(template().stdout)
    found = {(c["check_id"], _component(c["resource"])) for c in checkov(tmp_path, "kubernetes")}
    accepted = accepted_findings()
    assert accepted, "the README lists no accepted findings"
    assert found - accepted == set(), "checkov findings not listed (with a reason) in the chart README"
    assert accepted - found == set(), "README lists findings checkov no longer reports: remove them"
