"""The lab: a private network namespace with a bridge, and UML nodes plugged into it."""

import json
import os
import re
import shutil
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import netns
from .common import BRIDGE, LabError, run_host
from .forward import Forwarder
from .node import LabNode

UML = "/usr/bin/linux.uml"
UML_MODULES = Path("/usr/lib/uml/modules")
STATE_DIR = Path("/run/csilab")  # host side: which live process owns which lab, to clean up after a crash
FIRST_IP = {"storage": 11, "worker": 21}
LAST_IP = {"storage": 20, "worker": 99}
SETUP_HINT = "run scripts/setup (as root) to install User-Mode Linux, ethtool and the module link"


def preflight(uml: str = UML) -> str | None:
    """Why the lab cannot run on this machine, or None when it can."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, bridges, raw sockets)"
    if not os.access(uml, os.X_OK):
        return f"{uml} is missing: {SETUP_HINT}"
    versions = [d.name for d in UML_MODULES.iterdir()] if UML_MODULES.is_dir() else []
    if not versions or not all(Path("/lib/modules", v).exists() for v in versions):
        return f"UML kernel modules are not linked under /lib/modules: {SETUP_HINT}"
    for tool in ("ip", "ethtool"):  # ethtool runs in the guests (the host's tree is their root)
        if shutil.which(tool) is None:
            return f"{tool} is missing: {SETUP_HINT}"
    return None


class Lab:
    """Throw-away UML nodes on a private network. Use as a context manager; see csi/lab/__init__.py."""

    def __init__(self, workdir: Path, name: str = "lab", subnet: str = "10.213.0", mem: str = "768M",
                 uml: str = UML):
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,14}", name):
            raise LabError(f"lab name {name!r}: use 1-15 of [a-z0-9-]")
        if not re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})", subnet) or \
                any(int(o) > 255 for o in subnet.split(".")):
            raise LabError(f"subnet {subnet!r}: give the first three octets, like 10.213.0")
        self.workdir = Path(workdir).resolve()
        self.name = name
        self.subnet = subnet
        self.mem = mem
        self.uml = uml
        self.netns = f"csilab-{name}"
        self.host_ip = f"{subnet}.1"
        self.nodes: dict[str, LabNode] = {}
        self.netns_fd = -1
        self._home_fd = -1  # the namespace the lab was made from: where forwarders find host loopback
        self._entered_from: int | None = None
        self._forwarders: list[Forwarder] = []
        self._state_file = STATE_DIR / f"{name}.json"
        self._owner = False  # set once this object may tear down csilab-<name> (it is not another's)

    # --- life cycle -------------------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close(raise_errors=exc[0] is None)

    def _start(self) -> None:
        problem = preflight(self.uml)
        if problem:
            raise LabError(problem)
        reap_stale()
        if netns.exists(self.netns):
            raise LabError(f"network namespace {self.netns} exists and belongs to a live lab: pick another name")
        self._owner = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._state_file.write_text(json.dumps({"pid": os.getpid(), "netns": self.netns,
                                                "workdir": str(self.workdir), "subnet": self.subnet}))
        # Outside the namespace the lab's addresses must go nowhere: without this, a socket opened in the
        # wrong namespace would send them to the default route, off this machine.
        run_host(["ip", "route", "replace", "blackhole", f"{self.subnet}.0/24"])
        self._home_fd = netns.current_fd()
        netns.create(self.netns)
        self.netns_fd = os.open(netns.path(self.netns), os.O_RDONLY)
        self._start_bridge()

    def _start_bridge(self) -> None:
        # A Linux bridge, not a userspace switch (vde_switch, which the lab used first): every frame a node
        # sent cost the switch process a wake-up, and it forwarded about 41,000 frames/s however large.
        run_host(["ip", "-n", self.netns, "link", "add", BRIDGE, "type", "bridge"])
        run_host(["ip", "-n", self.netns, "addr", "add", f"{self.host_ip}/24", "dev", BRIDGE])
        run_host(["ip", "-n", self.netns, "link", "set", BRIDGE, "up"])

    def close(self, raise_errors: bool = False) -> None:
        """Stop everything the lab started; every step is tried. Console and process logs stay in workdir."""
        if not self._owner:
            return
        self._owner = False
        errors: list[str] = []

        def attempt(what, fn, *args):
            try:
                fn(*args)
            except Exception as e:  # collect, go on, report at the end
                errors.append(f"{what}: {e}")

        if self._entered_from is not None:
            attempt("leave", self.leave)
        for fwd in self._forwarders:
            attempt("forwarder", fwd.close)
        self._forwarders.clear()
        for node in self.nodes.values():
            attempt(f"kill {node.name}", node.kill)
        for pid in netns.pids(self.netns) if netns.exists(self.netns) else []:
            attempt(f"kill pid {pid} in {self.netns}", os.kill, pid, signal.SIGKILL)
        for fd in (self.netns_fd, self._home_fd):
            if fd >= 0:
                os.close(fd)
        self.netns_fd = self._home_fd = -1
        attempt("delete netns", netns.delete, self.netns)
        for node in self.nodes.values():
            if node.disk is not None:
                attempt(f"remove {node.disk}", node.disk.unlink, True)
            shutil.rmtree(node.workdir / f"{self.netns}-{node.name}", ignore_errors=True)  # UML's umid dir
        self._state_file.unlink(missing_ok=True)
        attempt("blackhole route", _drop_blackhole, self.subnet)
        if errors and raise_errors:
            raise LabError("lab cleanup: " + "; ".join(errors))

    # --- nodes ------------------------------------------------------------------------------------

    def add_node(self, name: str, role: str = "worker", disk_bytes: int = 4 << 30,
                 mem: str | None = None) -> LabNode:
        """A storage node gets the next address from <subnet>.11, a worker from <subnet>.21."""
        if role not in FIRST_IP:
            raise LabError(f"role {role!r}: one of {sorted(FIRST_IP)}")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,30}", name) or name in ("switch",):
            raise LabError(f"node name {name!r}: use [a-z0-9-]")
        if name in self.nodes:
            raise LabError(f"node {name} exists")
        taken = {n.ip for n in self.nodes.values()}
        free = (f"{self.subnet}.{i}" for i in range(FIRST_IP[role], LAST_IP[role] + 1))
        ip = next((a for a in free if a not in taken), None)
        if ip is None:
            raise LabError(f"no free address for another {role} node")
        node = LabNode(self, name, role, ip, disk_bytes, mem or self.mem)
        self.nodes[name] = node
        return node

    def node(self, name: str) -> LabNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise LabError(f"no node {name!r} in lab {self.name}") from None

    def boot_all(self, timeout: float = 120) -> None:
        """Boot every node that is not running, in parallel, and wait until each one's guestd answers."""
        if self.netns_fd < 0:
            raise LabError("boot_all() outside `with lab:`")
        todo = [n for n in self.nodes.values() if not n.running]
        for node in todo:
            node.start()
        with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
            futures = [pool.submit(node.wait_ready, timeout) for node in todo]
        failed = [str(f.exception()) for f in futures if f.exception()]
        if failed:
            raise LabError("boot failed:\n" + "\n".join(failed))

    # --- the host side of the network -------------------------------------------------------------

    def popen_in_netns(self, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """A host process inside the lab's namespace (it reaches <subnet>.x; it is killed at close())."""
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], **popen_kwargs)

    def enter(self) -> None:
        """Move the calling thread into the lab namespace. Call it before any gRPC channel or thread exists:
        threads that exist keep their namespace; threads created later inherit the creator's."""
        if self._entered_from is not None:
            raise LabError("already entered")
        self._entered_from = netns.current_fd()
        netns.setns(self.netns_fd)

    def leave(self) -> None:
        if self._entered_from is None:
            return
        fd, self._entered_from = self._entered_from, None
        try:
            netns.setns(fd)
        finally:
            os.close(fd)

    def expose(self, ip: str, port: int, local_port: int = 0) -> int:
        """Forward 127.0.0.1:<local_port> outside the lab to <ip>:<port> inside it; the port it listens on."""
        self._check_lab_ip(ip)
        fwd = Forwarder(self._home_fd, ("127.0.0.1", local_port), self.netns_fd, (ip, port))
        self._forwarders.append(fwd)
        return fwd.address[1]

    def publish(self, port: int, to_port: int | None = None) -> None:
        """Forward <host_ip>:<port> inside the lab to 127.0.0.1:<to_port> outside it (nodes reach a host
        service, e.g. an API server listening on loopback)."""
        fwd = Forwarder(self.netns_fd, (self.host_ip, port), self._home_fd, ("127.0.0.1", to_port or port))
        self._forwarders.append(fwd)

    def _check_lab_ip(self, ip: str) -> None:
        if not ip.startswith(self.subnet + ".") or ip == self.host_ip:
            raise LabError(f"{ip} is not a node address of lab {self.name} ({self.subnet}.0/24)")


def reap_stale() -> None:
    """Clean up after labs whose owning process died without close() (SIGKILL, a crash): their UML
    processes (found by umid=csilab-<lab>-), the processes in their namespace, the namespace itself and
    the disk images. Labs of live processes (other test runs, a demo) are left alone."""
    for state in STATE_DIR.glob("*.json") if STATE_DIR.is_dir() else []:
        try:
            info = json.loads(state.read_text())
            owner = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            info, owner = {}, 0
        if owner and _alive(owner):
            continue
        ns = str(info.get("netns", ""))
        if ns.startswith("csilab-"):
            marker = f"umid={ns}-".encode()
            for proc in Path("/proc").iterdir():
                if not proc.name.isdigit():
                    continue
                try:
                    if marker in (proc / "cmdline").read_bytes():
                        os.killpg(int(proc.name), signal.SIGKILL)
                except OSError:
                    pass
            if netns.exists(ns):
                for pid in netns.pids(ns):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                netns.delete(ns)
        workdir = info.get("workdir")
        if workdir:
            for disk in Path(workdir).glob("*/disk.img"):
                disk.unlink(missing_ok=True)
        state.unlink(missing_ok=True)
        if info.get("subnet"):
            _drop_blackhole(str(info["subnet"]))


def _drop_blackhole(subnet: str) -> None:
    """Remove the lab subnet's blackhole route unless another live lab uses the same subnet."""
    for state in STATE_DIR.glob("*.json") if STATE_DIR.is_dir() else []:
        try:
            info = json.loads(state.read_text())
            if info.get("subnet") == subnet and _alive(int(info["pid"])):
                return
        except (OSError, ValueError, KeyError, TypeError):
            continue
    run_host(["ip", "route", "del", "blackhole", f"{subnet}.0/24"], check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
