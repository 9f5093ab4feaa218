"""The scale benchmark's processes (bench/scale.py): the simulated agents (bench/agent_simulation.py, several per
process) and the real controller (`python -m csi controller`) in one work directory, and what the benchmark
reads of them: CPU seconds and memory from /proc, the largest agent answers, a py-spy profile."""

from __future__ import annotations

import json
import linecache
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

from csi.proto import csi_pb2 as csi
from csi.proto import csi_pb2_grpc
from csi.tls import TestPki

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import agent_simulation as sim  # noqa: E402  (bench/ is not a package)


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


# ---------------------------------------------------------------------------------------------- the fleet

class Fleet:
    """The simulated agents (in processes of --per-process) and the real controller, in one work dir."""

    def __init__(self, workdir: Path, agents: int, per_process: int):
        self.workdir = workdir
        self.agents = agents
        self.per_process = per_process
        self.procs: list[tuple[subprocess.Popen, Path, Path]] = []   # simulation processes, ready, stats
        self.controller: subprocess.Popen | None = None
        self.socket = workdir / "csi.sock"
        self.journal = workdir / "journal"
        self._logs: list = []

    def start(self) -> None:
        pki = TestPki(self.workdir / "pki")   # the CA, made once here; each simulated agent issues its own
        py = sys.executable
        for first in range(0, self.agents, self.per_process):
            count = min(self.per_process, self.agents - first)
            ready, stats = self.workdir / f"ready-{first}.json", self.workdir / f"stats-{first}.json"
            out = open(self.workdir / f"agents-{first}.log", "w")
            self._logs.append(out)
            proc = subprocess.Popen([py, str(HERE / "agent_simulation.py"), "--first", str(first), "--count",
                                     str(count), "--state-dir", str(self.workdir / "agents"), "--pki",
                                     str(pki.out), "--ready-file", str(ready), "--stats-file", str(stats)],
                                    cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            self.procs.append((proc, ready, stats))
        addresses: dict[str, str] = {}
        for proc, ready, _ in self.procs:
            addresses.update(self._wait_json(proc, ready, "simulated agents"))
        nodes = self.workdir / "storage-nodes.yaml"
        nodes.write_text(json.dumps({"storageNodes": [
            {"name": n, "address": a, "zone": f"zone-{i % 3}"} for i, (n, a) in enumerate(sorted(addresses.items()))]}))
        out = open(self.workdir / "controller.log", "w")
        self._logs.append(out)
        self.controller = subprocess.Popen(
            [py, "-m", "csi", "controller", "--endpoint", f"unix://{self.socket}", "--cluster-id", sim.CLUSTER_ID,
             "--storage-nodes", str(nodes), "--journal-dir", str(self.journal),
             "--tls-dir", str(pki.ensure("controller"))],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        self._wait_controller()

    @staticmethod
    def _wait_json(proc: subprocess.Popen, path: Path, what: str, limit: float = 120.0) -> dict:
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if path.exists():
                return json.loads(path.read_text())
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} before they were ready")
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready after {limit:.0f}s")

    def _wait_controller(self, limit: float = 120.0) -> None:
        """Until the controller serves, has adopted its (empty) journal, and its poller has every agent's pools."""
        end = time.monotonic() + limit
        expected = self.agents * sim.THIN_POOL_BYTES
        state = self.journal / "state.json"
        while time.monotonic() < end:
            if self.controller.poll() is not None:
                raise RuntimeError(f"the controller exited with {self.controller.returncode}: see "
                                   f"{self.workdir / 'controller.log'}")
            if self.socket.exists() and state.exists() and json.loads(state.read_text()).get("adopted"):
                try:
                    with self.channel() as ch:
                        cap = csi_pb2_grpc.ControllerStub(ch).GetCapacity(csi.GetCapacityRequest(), timeout=5)
                    if cap.available_capacity == expected:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.2)
        raise RuntimeError(f"the controller did not see all {self.agents} simulated agents in {limit:.0f}s")

    def agents_cpu(self) -> float:
        return sum(proc_cpu(proc.pid) for proc, _, _ in self.procs)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix:{self.socket}")

    def stop(self) -> dict:
        """Stops everything; returns the simulated agents' merged stats {"largest": {}, "calls": {}}."""
        merged = {"largest": {}, "calls": {}}
        if self.controller is not None and self.controller.poll() is None:
            self.controller.send_signal(signal.SIGTERM)
            try:
                self.controller.wait(20)
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait()
        for proc, _, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _, stats in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if stats.exists():
                data = json.loads(stats.read_text())
                for k, v in data["largest"].items():
                    merged["largest"][k] = max(v, merged["largest"].get(k, 0))
                for k, v in data["calls"].items():
                    merged["calls"][k] = merged["calls"].get(k, 0) + v
        for f in self._logs:
            f.close()
        return merged


class Profiler:
    """py-spy on the controller while it works (--profile): which of its functions its busy threads are in.
    py-spy is not a dependency of the project: `.venv/bin/pip install py-spy`."""

    def __init__(self, pid: int, out: Path):
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out = out
        self.proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
                                      "--nonblocking", "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, float]:
        """{function: share of the samples whose stack holds it}, for the driver's own functions and the
        gRPC calls, largest first."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(60)
        inclusive: Counter = Counter()
        total = 0
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            total += int(count)
            for frame in set(frames):
                name, _, where = frame.partition(" (")
                if where.startswith("csi/"):
                    inclusive[f"{name} ({where.split(':')[0]})"] += int(count)
            # The leaf's source line says when a thread waits in fsync (a file's or a directory's).
            leaf = frames[-1].partition(" (")[2].rstrip(")")
            path, _, lineno = leaf.rpartition(":")
            if path.startswith("csi/") and lineno.isdigit() and \
                    "os.fsync(" in linecache.getline(str(REPO / path), int(lineno)):
                inclusive["in os.fsync (file or directory)"] += int(count)
        return {k: n / total for k, n in inclusive.most_common()} if total else {}
