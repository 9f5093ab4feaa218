"""A small Kubernetes cluster on a lab: the control plane on the host inside the lab's network namespace,
kubelet + containerd on every UML node. For the Kubernetes e2e tests (tests/e2e/k8s).

    with Lab(workdir, name="k8s", mem="2560M") as lab:
        s1 = lab.add_node("storage-1", role="storage"); w1 = lab.add_node("worker-1")
        lab.boot_all()
        cluster = Cluster(lab, bin_dir=<CSI_CACHE>/bin)
        cluster.start_control_plane()                 # etcd, kube-apiserver, -controller-manager, -scheduler
        cluster.join(s1, labels={...}); cluster.join(w1)   # containerd, CNI, kube-proxy, kubelet
        cluster.import_images([archive, ...])          # ctr images import on every node, in parallel
        cluster.wait_nodes_ready()
        s1.kill(); s1.boot(); cluster.rejoin(s1, [archive, ...])   # a power cut, and the node back in the cluster
        cluster.kubectl(["get", "nodes"])              # runs inside the namespace with the admin kubeconfig

Where things run and why:
  - etcd listens on 127.0.0.1 of the lab namespace (only the API server talks to it); the API server on
    <subnet>.1:6443 (lab.host_ip), the address every node reaches; controller-manager and scheduler beside
    it. All are host processes started with lab.popen_in_netns, so they are killed with the namespace.
  - Each node (see join): cgroup2 on /sys/fs/cgroup, a tmpfs for containerd's and kubelet's state, / made
    rshared (kubelet's Bidirectional mount propagation), the UML modules bind-mounted at /lib/modules/<ver>
    (not the host's symlink, which a container would see dangling), overlay/veth/bridge/netfilter modules,
    iptables switched to the legacy backend in the node's own /etc, containerd + runc (Debian) with the CRI
    plugin, CNI bridge + host-local (Debian's containernetworking-plugins) with one /24 per node and static
    routes between the nodes, kube-proxy (iptables mode: the `kubernetes` Service's ClusterIP reaches the API
    server), kubelet with a client certificate for system:node:<name>.
  - What a real node keeps on its disk across a reboot (PERSISTENT: the driver's state directory) is a
    directory of the node's in the lab workdir, bind-mounted; everything else of containerd and kubelet is
    tmpfs, so a node booted again after a power cut is rejoined with its images imported again (rejoin).
  - Pod and Service addresses (10.244.0.0/16, 10.96.0.0/16) exist only inside the guests; the lab
    namespace routes each node's pod /24 to that node and knows nothing else, so no packet leaves the lab.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .common import LabError, tail
from .lab import Lab
from .node import LabNode

API_PORT = 6443
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
UML_MODULES = Path("/usr/lib/uml/modules")
CNI_BIN = "/usr/lib/cni"
NODE_MODULES = ["overlay", "veth", "bridge", "br_netfilter", "nf_conntrack", "ip_tables", "iptable_filter",
                "iptable_nat", "iptable_mangle", "iptable_raw", "xt_conntrack", "xt_comment", "xt_mark",
                "xt_MASQUERADE", "xt_addrtype", "xt_multiport", "xt_statistic", "xt_nat", "xt_tcpudp"]
# Host paths of a node that outlive its reboot, as on a real machine's disk: the driver's state (the chart's
# agent.stateDir: each volume's export record, with its CHAP secrets, which the agent rebuilds exports from).
PERSISTENT = ("/var/lib/lvm-iscsi-csi",)


# ------------------------------------------------------------------------------------------ PKI

def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Pki:
    """A cluster CA and the certificates of the control plane, the nodes and the admin, as files in dir."""

    dir: Path
    _ca_key: object = field(init=False, repr=False)
    _ca: x509.Certificate = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lvm-iscsi-csi e2e kubernetes CA")])
        self._ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                    .public_key(self._ca_key.public_key()).serial_number(x509.random_serial_number())
                    .not_valid_before(now - datetime.timedelta(hours=1))
                    .not_valid_after(now + datetime.timedelta(days=7))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                 content_commitment=False, key_encipherment=False,
                                                 data_encipherment=False, key_agreement=False,
                                                 encipher_only=False, decipher_only=False), critical=True)
                    .sign(self._ca_key, hashes.SHA256()))
        self._write("ca.crt", self._ca.public_bytes(serialization.Encoding.PEM))
        self._write("ca.key", _pem_key(self._ca_key), 0o600)
        sa = ec.generate_private_key(ec.SECP256R1())
        self._write("sa.key", _pem_key(sa), 0o600)
        self._write("sa.pub", sa.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def _write(self, name: str, data: bytes, mode: int = 0o644) -> Path:
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(mode)
        return path

    def issue(self, name: str, cn: str, orgs: tuple[str, ...] = (), dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), server: bool = False) -> tuple[Path, Path]:
        """<name>.crt and <name>.key, signed by the CA; a client certificate unless server."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs] +
                            [x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self._ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=7))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if dns or ips:
            b = b.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]),
                critical=False)
        cert = b.sign(self._ca_key, hashes.SHA256())
        return (self._write(f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM)),
                self._write(f"{name}.key", _pem_key(key), 0o600))

    def kubeconfig(self, path: Path, server: str, name: str, cn: str, orgs: tuple[str, ...] = ()) -> Path:
        crt, key = self.issue(name, cn, orgs)
        b64 = lambda p: base64.b64encode(p.read_bytes()).decode()  # noqa: E731
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "e2e",
            "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority-data": b64(self.ca)}}],
            "users": [{"name": cn, "user": {"client-certificate-data": b64(crt), "client-key-data": b64(key)}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": cn}}],
        }))
        path.chmod(0o600)
        return path


# ------------------------------------------------------------------------------------------ cluster

class Cluster:
    """See the module docstring. Everything it starts is stopped by the lab's close() (host processes in
    the namespace, processes inside the nodes); stop() ends the control plane earlier."""

    def __init__(self, lab: Lab, bin_dir: Path, workdir: Path | None = None,
                 sandbox_image: str = "e2e.local/pause:3.10"):
        self.lab = lab
        self.bin = Path(bin_dir)
        self.dir = Path(workdir or lab.workdir / "k8s")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sandbox_image = sandbox_image
        self.server = f"https://{lab.host_ip}:{API_PORT}"
        self.pki = Pki(self.dir / "pki")
        self.admin_kubeconfig = self.pki.kubeconfig(self.dir / "admin.kubeconfig", self.server, "admin",
                                                    "e2e-admin", ("system:masters",))
        self.procs: dict[str, subprocess.Popen] = {}
        self.nodes: dict[str, LabNode] = {}
        self.pod_cidrs: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        for b in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
                  "kube-proxy", "kubectl"):
            if not (self.bin / b).exists():
                raise LabError(f"{self.bin / b} is missing: run scripts/build-k8s")

    # --- control plane ------------------------------------------------------------------------

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "ab")
        try:
            self.procs[name] = self.lab.popen_in_netns(argv, stdout=log, stderr=subprocess.STDOUT,
                                                       stdin=subprocess.DEVNULL)
        finally:
            log.close()

    def _check_running(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise LabError(f"{name} exited with {proc.returncode}:\n{tail(self.dir / f'{name}.log')}")

    def start_control_plane(self, timeout: float = 180) -> None:
        t0 = time.monotonic()
        pki, d, host = self.pki, self.dir, self.lab.host_ip
        self._start("etcd", [
            str(self.bin / "etcd"), "--name", "e2e", "--data-dir", str(d / "etcd"),
            "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
            "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
            "--initial-cluster", "e2e=http://127.0.0.1:2380", "--listen-metrics-urls", "http://127.0.0.1:2381",
            # a throw-away cluster on a shared disk: no fsync per write
            "--unsafe-no-fsync", "--snapshot-count", "10000", "--log-level", "warn"])
        service_ip = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))
        crt, key = pki.issue("apiserver", "kube-apiserver", server=True, ips=(host, service_ip, "127.0.0.1"),
                             dns=("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                  f"kubernetes.default.svc.{CLUSTER_DOMAIN}", "localhost"))
        kcrt, kkey = pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",))
        self._start("kube-apiserver", [
            str(self.bin / "kube-apiserver"), "--etcd-servers", "http://127.0.0.1:2379",
            "--bind-address", host, "--advertise-address", host, "--secure-port", str(API_PORT),
            "--service-cluster-ip-range", SERVICE_CIDR, "--allow-privileged=true",
            "--tls-cert-file", str(crt), "--tls-private-key-file", str(key), "--client-ca-file", str(pki.ca),
            "--kubelet-client-certificate", str(kcrt), "--kubelet-client-key", str(kkey),
            "--service-account-key-file", str(pki.dir / "sa.pub"),
            "--service-account-signing-key-file", str(pki.dir / "sa.key"),
            "--service-account-issuer", f"https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
            "--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
            # node names resolve nowhere in the lab (no DNS): exec, logs and port-forward use the node's IP
            "--kubelet-preferred-address-types", "InternalIP",
            "--profiling=false", "--v=1"])
        self._wait_api(timeout, t0)
        self.timings["apiserver ready"] = round(time.monotonic() - t0, 1)
        self._start("kube-controller-manager", [
            str(self.bin / "kube-controller-manager"), "--kubeconfig", str(self.admin_kubeconfig),
            "--authentication-kubeconfig", str(self.admin_kubeconfig),
            "--authorization-kubeconfig", str(self.admin_kubeconfig),
            "--bind-address", "127.0.0.1", "--leader-elect=false", "--use-service-account-credentials=true",
            "--service-account-private-key-file", str(pki.dir / "sa.key"), "--root-ca-file", str(pki.ca),
            "--cluster-signing-cert-file", str(pki.ca), "--cluster-signing-key-file", str(pki.dir / "ca.key"),
            "--service-cluster-ip-range", SERVICE_CIDR, "--profiling=false", "--v=1"])
        self._start("kube-scheduler", [
            str(self.bin / "kube-scheduler"), "--kubeconfig", str(self.admin_kubeconfig),
            "--authentication-kubeconfig", str(self.admin_kubeconfig),
            "--authorization-kubeconfig", str(self.admin_kubeconfig),
            "--bind-address", "127.0.0.1", "--leader-elect=false", "--profiling=false", "--v=1"])
        # The default ServiceAccount appears once the controller-manager runs: pods need it.
        self.wait_for(lambda: self.kubectl(["get", "serviceaccount", "default"], check=False).returncode == 0,
                      timeout, "the default ServiceAccount (controller-manager)")
        self.timings["control plane ready"] = round(time.monotonic() - t0, 1)

    def _wait_api(self, timeout: float, t0: float) -> None:
        last = ""
        while time.monotonic() - t0 < timeout:
            self._check_running()
            done = self.kubectl(["get", "--raw", "/readyz"], check=False)
            if done.returncode == 0 and done.stdout.strip() == "ok":
                return
            last = (done.stdout + done.stderr).strip()[-500:]
            time.sleep(1)
        raise LabError(f"kube-apiserver not ready after {timeout}s: {last}\n"
                       f"{tail(self.dir / 'kube-apiserver.log')}")

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self.procs.clear()

    # --- clients ---------------------------------------------------------------------------------

    def kubectl(self, args: list[str], check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
        return self.host_tool([str(self.bin / "kubectl"), "--kubeconfig", str(self.admin_kubeconfig), *args],
                              check=check, input=input, timeout=timeout)

    def host_tool(self, argv: list[str], check: bool = True, input: str | None = None, timeout: float = 120,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A host program (kubectl, helm) inside the lab's namespace, where the API server's address is."""
        done = subprocess.run(["ip", "netns", "exec", self.lab.netns, *argv], capture_output=True, text=True,
                              input=input, timeout=timeout, env={**os.environ, **(env or {})})
        if check and done.returncode != 0:
            raise LabError(f"{argv[0]} {' '.join(argv[1:])} failed with {done.returncode}:\n"
                           f"{done.stdout[-2000:]}{done.stderr[-3000:]}")
        return done

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl(["get", *args, "-o", "json"]).stdout)

    def apply(self, manifest: dict | list) -> None:
        docs = manifest if isinstance(manifest, list) else [manifest]
        self.kubectl(["apply", "-f", "-"], input=yaml.safe_dump_all(docs))

    @staticmethod
    def wait_for(predicate, timeout: float, what: str, interval: float = 1.0):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise LabError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(interval)

    # --- nodes ------------------------------------------------------------------------------------

    def join(self, node: LabNode, labels: dict[str, str] | None = None) -> None:
        """Make node a Kubernetes node: runtime, network, kube-proxy, kubelet (see the module docstring)."""
        index = len(self.nodes) + 1
        self.nodes[node.name] = node
        self.pod_cidrs[node.name] = f"10.244.{index}.0/24"
        d = self.dir / node.name
        d.mkdir(parents=True, exist_ok=True)
        self._prepare_host(node)
        self._start_containerd(node, d)
        self._start_kube_proxy(node, d)
        self._start_kubelet(node, d, labels or {})
        self._route_pod_cidrs()

    def rejoin(self, node: LabNode, archives: list[Path], timeout: float = 240) -> float:
        """A node booted again (after a power cut): its runtime, images (imported before kubelet starts, so no pod
        of the node meets a missing image and its back-off), kube-proxy and kubelet, under the same Node, pod
        range and certificates; waits until the Node is Ready. Returns the seconds it took."""
        t0 = time.monotonic()
        d = self.dir / node.name
        self._prepare_host(node)
        self._start_containerd(node, d)
        self.import_images(archives, nodes=[node])
        self._start_kube_proxy(node, d)
        self._start_kubelet(node, d, {})   # the Node object keeps the labels it had
        self._route_pod_cidrs()
        self.wait_nodes_ready(timeout)
        return time.monotonic() - t0

    def _run(self, node: LabNode, argv: list[str], timeout: float = 60, input: str | None = None) -> str:
        return node.run(argv, timeout=timeout, input=input, check=True).stdout

    def _write(self, node: LabNode, path: str, text: str) -> None:
        self._run(node, ["mkdir", "-p", str(Path(path).parent)])
        self._run(node, ["tee", path], input=text)

    def _prepare_host(self, node: LabNode) -> None:
        run = lambda *argv, **kw: self._run(node, list(argv), **kw)  # noqa: E731
        if "cgroup2" not in run("stat", "-f", "-c", "%T", "/sys/fs/cgroup"):
            run("mount", "-t", "cgroup2", "-o", "nsdelegate", "cgroup2", "/sys/fs/cgroup")
        controllers = run("cat", "/sys/fs/cgroup/cgroup.controllers").split()
        self._write(node, "/sys/fs/cgroup/cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))
        # The host links /lib/modules/<ver> to /usr/lib/uml/modules/<ver>; a container given the node's
        # /lib/modules would see that link dangle. A directory bind-mounted in a tmpfs does not.
        versions = sorted(p.name for p in UML_MODULES.iterdir())
        run("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/usr/lib/modules")
        for v in versions:
            run("mkdir", "-p", f"/usr/lib/modules/{v}")
            run("mount", "--bind", "-o", "ro", str(UML_MODULES / v), f"/usr/lib/modules/{v}")
        run("modprobe", "-a", *NODE_MODULES)
        # kubelet's cAdvisor refuses to start without a clock speed, and UML's /proc/cpuinfo has none (nor
        # cpufreq in sysfs): the node's processes get a copy with a "cpu MHz" line per processor.
        # Containers mount a proc of their own and still see the real one.
        blocks = [b for b in run("cat", "/proc/cpuinfo").strip().split("\n\n") if b.strip()]
        fake = "\n\n".join(b + "\ncpu MHz\t\t: 1000.000" if "cpu MHz" not in b else b for b in blocks) + "\n\n"
        self._write(node, "/run/k8s-e2e/cpuinfo", fake)
        run("mount", "--bind", "-o", "ro", "/run/k8s-e2e/cpuinfo", "/proc/cpuinfo")
        for key in ("net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1",
                    "net.bridge.bridge-nf-call-ip6tables=1"):
            run("sysctl", "-qw", key)
        for tool in ("iptables", "ip6tables"):   # the node's /etc/alternatives: its own tmpfs overlay
            run("update-alternatives", "--set", tool, f"/usr/sbin/{tool}-legacy")
        run("mount", "--make-rshared", "/")
        for path, size in (("/var/lib/containerd", "75%"), ("/var/lib/kubelet", "25%"), ("/var/lib/cni", "16m"),
                           ("/var/log/pods", "10%"), ("/var/log/containers", "16m")):
            run("mkdir", "-p", path)
            run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path)
        run("mount", "--make-rshared", "/var/lib/kubelet")
        for path in PERSISTENT:
            disk = node.workdir / "persistent" / path.strip("/").replace("/", "-")
            run("mkdir", "-p", str(disk), path)
            run("mount", "--bind", str(disk), path)

    def _start_containerd(self, node: LabNode, d: Path) -> None:
        config = d / "containerd.toml"
        config.write_text(CONTAINERD_CONFIG.format(sandbox_image=self.sandbox_image, cni_bin=CNI_BIN))
        cidr = self.pod_cidrs[node.name]
        gateway = str(next(ipaddress.ip_network(cidr).hosts()))
        self._write(node, "/etc/cni/net.d/10-e2e.conflist", json.dumps({
            "cniVersion": "1.0.0", "name": "e2e",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "hairpinMode": True,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": cidr, "gateway": gateway}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ]}, indent=1))
        node.spawn("containerd", ["/usr/bin/containerd", "--config", str(config)])
        self.wait_for(lambda: node.run(["ctr", "--address", "/run/containerd/containerd.sock", "version"],
                                       timeout=20).rc == 0 or self._died(node, "containerd"),
                      60, f"containerd on {node.name}", interval=0.5)

    def _died(self, node: LabNode, name: str) -> bool:
        st = node.status(name)
        if not st["running"]:
            raise LabError(f"{node.name}: {name} exited with {st['rc']}:\n{tail(node.log_path(name))}")
        return False

    def _start_kube_proxy(self, node: LabNode, d: Path) -> None:
        kubeconfig = self.pki.kubeconfig(d / "kube-proxy.kubeconfig", self.server, f"{node.name}-kube-proxy",
                                         "system:kube-proxy")
        config = d / "kube-proxy.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)}, "hostnameOverride": node.name,
            "mode": "iptables", "clusterCIDR": POD_CIDR,
            "bindAddress": node.ip, "healthzBindAddress": "127.0.0.1:10256", "metricsBindAddress": "127.0.0.1:10249",
            # UML's nf_conntrack sysctls are not worth tuning for a two-node test cluster
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        }))
        node.spawn("kube-proxy", [str(self.bin / "kube-proxy"), "--config", str(config), "--v=1"])

    def _start_kubelet(self, node: LabNode, d: Path, labels: dict[str, str]) -> None:
        kubeconfig = self.pki.kubeconfig(d / "kubelet.kubeconfig", self.server, f"{node.name}-kubelet",
                                         f"system:node:{node.name}", ("system:nodes",))
        crt, key = self.pki.issue(f"{node.name}-kubelet-serving", node.name, ("system:nodes",),
                                  dns=(node.name,), ips=(node.ip,), server=True)
        config = d / "kubelet.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.pki.ca)}},
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(crt), "tlsPrivateKeyFile": str(key),
            "cgroupDriver": "cgroupfs", "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
            "failSwapOn": False, "clusterDomain": CLUSTER_DOMAIN, "resolvConf": "/etc/resolv.conf",
            "podCIDR": self.pod_cidrs[node.name],
            # Images come from `ctr import` only: nothing may garbage-collect them, since nothing can pull.
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "32Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "nodeStatusUpdateFrequency": "5s", "syncFrequency": "10s", "fileCheckFrequency": "10s",
            "serializeImagePulls": False, "maxPods": 30, "protectKernelDefaults": False,
            "localStorageCapacityIsolation": True, "volumePluginDir": "/var/lib/kubelet/volumeplugins",
        }))
        argv = [str(self.bin / "kubelet"), "--config", str(config), "--kubeconfig", str(kubeconfig),
                "--hostname-override", node.name, "--node-ip", node.ip, "--root-dir", "/var/lib/kubelet",
                "--v=1"]
        if labels:
            argv += ["--node-labels", ",".join(f"{k}={v}" for k, v in sorted(labels.items()))]
        node.spawn("kubelet", argv)

    def _route_pod_cidrs(self) -> None:
        """Each node's pod /24 reaches the other nodes and the lab namespace through that node's address.
        The Service range goes to the lab's host address: a node has no default route, and without a route a
        hostNetwork process's connect() to a ClusterIP fails (ENETUNREACH) before kube-proxy's OUTPUT DNAT
        can rewrite it. An address that no Service has ends in the lab namespace, which forwards nothing."""
        for node in self.nodes.values():
            self._run(node, ["ip", "route", "replace", SERVICE_CIDR, "via", self.lab.host_ip])
        for name, cidr in self.pod_cidrs.items():
            via = self.nodes[name].ip
            self.host_tool(["ip", "route", "replace", cidr, "via", via])
            for other in self.nodes.values():
                if other.name != name:
                    self._run(other, ["ip", "route", "replace", cidr, "via", via])

    def import_images(self, archives: list[Path], nodes: list[LabNode] | None = None) -> dict[str, float]:
        """`ctr images import` of every archive on every node (in parallel over nodes): seconds per node."""
        def one(node: LabNode) -> float:
            t0 = time.monotonic()
            for archive in archives:
                r = node.run(["ctr", "--address", "/run/containerd/containerd.sock", "--namespace", "k8s.io",
                              "images", "import", str(archive)], timeout=900)
                if r.rc != 0:
                    raise LabError(f"{node.name}: ctr import {archive}: {r.stderr.strip()[-1000:]}")
            return round(time.monotonic() - t0, 1)
        todo = nodes or list(self.nodes.values())
        with ThreadPoolExecutor(max_workers=len(todo)) as pool:
            return dict(zip((n.name for n in todo), pool.map(one, todo)))

    def wait_nodes_ready(self, timeout: float = 240) -> None:
        def ready():
            for node in self.nodes.values():
                for name in ("containerd", "kube-proxy", "kubelet"):
                    self._died(node, name)
            out = self.kubectl(["get", "nodes", "-o", "json"], check=False)
            if out.returncode != 0:
                return False
            items = json.loads(out.stdout)["items"]
            ok = {n["metadata"]["name"] for n in items
                  if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))}
            return ok >= set(self.nodes)
        t0 = time.monotonic()
        self.wait_for(ready, timeout, f"nodes {sorted(self.nodes)} Ready", interval=2)
        self.timings["nodes ready"] = round(time.monotonic() - t0, 1)


CONTAINERD_CONFIG = """\
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.internal.v1.tracing"]

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "/etc/cni/net.d"
"""
