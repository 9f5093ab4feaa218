"""One lab node: a User-Mode Linux process, and the client of the guestd that runs inside it."""

import hashlib
import json
import os
import signal as signals
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import netns
from .common import BRIDGE, GuestResult, LabError, run_host, tail

if TYPE_CHECKING:
    from .lab import Lab

GUEST_INIT = Path(__file__).with_name("guest-init.sh")
GUESTD = Path(__file__).with_name("guestd.py")
GUESTD_PORT = 7000
PROJECT_DIR = Path(__file__).resolve().parents[2]   # the checkout (holds csi/)
IQN_PREFIX = "iqn.2026-11.dev.csi.lvm-iscsi.lab:"
VG_NAME = "csi-vg"
THIN_POOL_PERCENT = 60
READY = "CSILAB-READY"
FAILED = "CSILAB-FAILED"


class LabNode:
    """A node of the lab. Storage nodes get a VG "csi-vg" with a thin pool "thinpool" on a loop device over
    workdir/disk.img (kept across reboot); every node gets an initiator IQN, iscsid and udev."""

    def __init__(self, lab: "Lab", name: str, role: str, ip: str, disk_bytes: int, mem: str):
        self._lab = lab
        self.name = name
        self.role = role
        self.ip = ip
        self.disk_bytes = disk_bytes
        self.mem = mem
        self.workdir: Path = lab.workdir / name
        self.initiator_iqn = IQN_PREFIX + name
        self.mac = "02:c5:" + ":".join(f"{int(o):02x}" for o in ip.split("."))
        # The node's cable: a veth pair in the lab namespace, one end on the bridge, the other read and
        # written by UML's vector driver through a raw socket.
        octet = ip.rsplit(".", 1)[1]
        self.bridge_port, self.cable = f"csil{octet}p", f"csil{octet}n"
        self.disk: Path | None = self.workdir / "disk.img" if role == "storage" else None
        self.console: Path = self.workdir / "console.log"
        self.boot_seconds: list[float] = []  # start of the UML process to guestd answering, per boot
        self._proc: subprocess.Popen | None = None
        self._console_start = 0
        self._started_at = 0.0

    def __repr__(self):
        return f"LabNode({self.name!r}, role={self.role!r}, ip={self.ip!r})"

    # --- power ---------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def boot(self, timeout: float = 120) -> None:
        self.start()
        self.wait_ready(timeout)

    def start(self) -> None:
        """Start the UML process; wait_ready() waits for it."""
        if self.running:
            raise LabError(f"{self.name} is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.disk is not None and not self.disk.exists():
            with open(self.disk, "wb") as f:
                f.truncate(self.disk_bytes)  # sparse
        self._plug_in()
        with open(self.console, "ab") as console:
            console.write(f"\n=== csilab: boot {len(self.boot_seconds) + 1} of {self.name} "
                          f"at {time.strftime('%H:%M:%S')}\n".encode())
            console.flush()
            self._console_start = console.tell()
            self._started_at = time.monotonic()
            # Own process group: UML forks helpers, and kill() takes them all down together.
            self._proc = subprocess.Popen(
                self._command_line(), stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                cwd=self.workdir, start_new_session=True,
                # Guest memory is a file in TMPDIR: on tmpfs it is never written back to a disk.
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": "/dev/shm"})

    def _plug_in(self) -> None:
        """The node's veth pair, made once: it outlives reboots and power cuts, like a cable."""
        ns = self._lab.netns
        if run_host(["ip", "-n", ns, "link", "show", self.cable], check=False).returncode == 0:
            return
        run_host(["ip", "-n", ns, "link", "add", self.bridge_port, "type", "veth", "peer", "name", self.cable])
        run_host(["ip", "-n", ns, "link", "set", self.bridge_port, "master", BRIDGE, "up"])
        run_host(["ip", "-n", ns, "link", "set", self.cable, "up"])

    def _command_line(self) -> list[str]:
        lab = self._lab
        params = {
            "name": self.name, "role": self.role, "ip": self.ip, "iqn": self.initiator_iqn,
            "labdir": str(lab.workdir), "nodedir": str(self.workdir), "port": str(GUESTD_PORT),
            "machine_id": hashlib.md5(f"{lab.name}/{self.name}".encode()).hexdigest(),
            "vg": VG_NAME, "thinpool_percent": str(THIN_POOL_PERCENT),
            "python": sys.executable, "guestd": str(GUESTD),
            # host directories a guest needs that its own tmpfs (/tmp, /run) would hide: the project and
            # its venv, wherever the checkout is (CI may clone under /tmp)
            "hostdirs": ":".join(sorted({str(PROJECT_DIR), sys.prefix})),
        }
        for key, value in params.items():
            if not value or any(c.isspace() or c == "," for c in value):
                raise LabError(f"{self.name}: parameter {key}={value!r} cannot go on a kernel command line")
        return [
            # In the lab namespace, where the node's veth is; nothing else of the host changes for it.
            "ip", "netns", "exec", lab.netns,
            lab.uml, f"mem={self.mem}", f"umid={lab.netns}-{self.name}", f"uml_dir={self.workdir}",
            "root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro", f"init={GUEST_INIT}",
            # gro=1: the veth hands over coalesced frames, as a NIC with GRO would (guest-init names it eth0)
            f"vec0:transport=raw,ifname={self.cable},depth=128,gro=1,mac={self.mac}",
            "con=null", "con0=fd:0,fd:1", "net.ifnames=0",
            *(f"csilab_{k}={v}" for k, v in params.items()),
        ]

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            text = tail(self.console, lines=400, start=self._console_start)
            if f"{FAILED} {self.name}" in text:
                self.kill()
                raise LabError(f"{self.name}: boot failed:\n{self.console_tail()}")
            if f"{READY} {self.name}" in text:
                break
            if not self.running:
                raise LabError(f"{self.name}: UML exited with rc {self._proc.returncode} during boot:\n"
                               f"{self.console_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise LabError(f"{self.name}: not ready after {timeout}s:\n{self.console_tail()}")
            time.sleep(0.2)
        self._call({"op": "ping"}, timeout=max(5.0, deadline - time.monotonic()))
        self.boot_seconds.append(round(time.monotonic() - self._started_at, 2))

    def kill(self) -> None:
        """Power cut: SIGKILL to the UML process group. The disk image stays; tmpfs state is gone."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signals.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"{self.name}: UML pid {self._proc.pid} survived SIGKILL") from e

    def unplug(self) -> None:
        """Network cut: the bridge's end of the node's cable goes down. The node runs on, cut off from every other
        node and from the host (guestd too) until plug()."""
        run_host(["ip", "-n", self._lab.netns, "link", "set", self.bridge_port, "down"])

    def plug(self) -> None:
        run_host(["ip", "-n", self._lab.netns, "link", "set", self.bridge_port, "up"])

    def reboot(self, timeout: float = 120) -> None:
        self.kill()
        self.boot(timeout)

    def poweroff(self, timeout: float = 30) -> None:
        """Clean halt (sync, then power off), unlike kill()."""
        if not self.running:
            return
        self._call({"op": "poweroff"}, timeout=10)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        else:
            self.kill()  # helpers left in the group, if any

    def console_tail(self, lines: int = 40) -> str:
        return tail(self.console, lines=lines, start=self._console_start)

    # --- guestd requests --------------------------------------------------------------------------

    def run(self, argv: list[str], timeout: float = 60, env: dict[str, str] | None = None,
            input: str | None = None, cwd: str | None = None, check: bool = False) -> GuestResult:
        """Run argv in the guest and wait for it. LabError on timeout (the command's group is killed)."""
        reply = self._call({"op": "run", "argv": _argv(argv), "timeout": timeout, "env": env or {},
                            "input": input, "cwd": cwd}, timeout=timeout + 15)
        result = GuestResult(reply["rc"], reply["stdout"], reply["stderr"])
        return result.check(f"{self.name}: {argv}") if check else result

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              cwd: str | None = None) -> int:
        """Start a named background process in the guest; its output goes to self.log_path(name)."""
        return self._call({"op": "spawn", "name": name, "argv": _argv(argv), "env": env or {}, "cwd": cwd})["pid"]

    def signal(self, name: str, sig: int = signals.SIGTERM, group: bool = False) -> None:
        self._call({"op": "signal", "name": name, "signal": int(sig), "group": group})

    def status(self, name: str) -> dict:
        """{"pid": int, "running": bool, "rc": int | None} of a spawned process."""
        reply = self._call({"op": "status", "name": name})
        return {k: reply[k] for k in ("pid", "running", "rc")}

    def wait_exit(self, name: str, timeout: float = 30) -> int:
        """Wait until a spawned process has exited; its exit code (negative: killed by that signal)."""
        deadline = time.monotonic() + timeout
        while (st := self.status(name))["running"]:
            if time.monotonic() > deadline:
                raise LabError(f"{self.name}: {name} still running after {timeout}s")
            time.sleep(0.1)
        return st["rc"]

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _call(self, request: dict, timeout: float = 30) -> dict:
        if not self.running:
            raise LabError(f"{self.name} is not running")
        try:
            with netns.connect_in(self._lab.netns_fd, (self.ip, GUESTD_PORT), timeout=timeout) as sock:
                sock.sendall(json.dumps(request).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    data += chunk
        except OSError as e:
            raise LabError(f"{self.name}: guestd {request['op']}: {e}") from e
        if not data:
            raise LabError(f"{self.name}: guestd closed the connection on {request['op']}")
        reply = json.loads(data)
        if not reply.get("ok"):
            raise LabError(f"{self.name}: {request['op']} {request.get('argv') or request.get('name') or ''}: "
                           f"{reply.get('error')}\n{reply.get('stderr', '')}".rstrip())
        return reply


def _argv(argv) -> list[str]:
    if isinstance(argv, (str, bytes)) or not all(isinstance(a, (str, os.PathLike)) for a in argv):
        raise LabError(f"argv must be a list of strings, not {argv!r}")
    return [os.fspath(a) for a in argv]
