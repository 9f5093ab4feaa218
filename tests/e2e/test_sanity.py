"""csi-sanity (kubernetes-csi/csi-test, built from the Go module proxy by scripts/build-go-tools) against the
real controller and node plugin: a storage node and a worker in UML.

It runs in the background beside the UML tests of the shared cluster (tests/e2e/conftest.py starts it).
Every spec for the advertised capabilities must pass; specs csi-sanity skips (capabilities not advertised,
such as snapshots and expansion) are reported, not counted as passes.
"""

from __future__ import annotations

import os
import subprocess
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from csi.lab import Lab, preflight
from csi.lab.deploy import Deployment

pytestmark = pytest.mark.e2e

CACHE = Path(os.environ.get("CSI_CACHE", "/var/cache/lvm-iscsi-csi"))
SANITY = CACHE / "bin" / "csi-sanity"


class SanityRun:
    """csi-sanity against a lab of its own (a storage node and a worker), run in a thread: csi-sanity drives it
    and the test process only waits, so it runs beside the UML tests that share the cluster (the `cluster`
    fixture starts it first) and the test below collects the result. Nothing of it outlives `join`."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.junit = workdir / "junit.xml"
        self.returncode: int | None = None
        self.output = ""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="csi-sanity", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            pytest.fail(f"csi-sanity did not finish within {timeout:.0f}s", pytrace=False)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            problem = preflight()
            if problem:
                raise RuntimeError(f"e2e tests need User-Mode Linux: {problem}")
            if not SANITY.exists():
                raise RuntimeError(f"{SANITY} is missing: run scripts/setup (it builds csi-sanity from the Go module "
                                   "proxy)")
            with Lab(self.workdir, name=f"san{os.getpid() % 100000}", subnet="10.213.2") as lab:
                s1 = lab.add_node("storage-1", role="storage", disk_bytes=4 << 30)
                w = lab.add_node("worker-1", role="worker")
                lab.boot_all(timeout=300)
                d = Deployment(lab, cluster_id="sanity", zones={"storage-1": "zone-a", "worker-1": "zone-a"})
                d.start_agent(s1)
                node_target = d.start_node_plugin(w)
                d.start_controller([s1])
                kubelet = d.kubelet_dir(w)
                argv = [str(SANITY), f"--csi.endpoint={node_target}",
                        f"--csi.controllerendpoint={d.controller_target}",
                        f"--csi.stagingdir={kubelet}/sanity-staging", f"--csi.mountdir={kubelet}/sanity-mount",
                        "--csi.testvolumesize=67108864", "--csi.testvolumeexpandsize=134217728",
                        f"--ginkgo.junit-report={self.junit}", "--ginkgo.timeout=20m", "--ginkgo.no-color"]
                r = subprocess.run(argv, capture_output=True, text=True, timeout=1500)
                self.output = r.stdout + r.stderr
                (self.workdir / "csi-sanity.log").write_text(self.output)
                self.returncode = r.returncode
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which raises it
            self.error = exc


def test_csi_sanity(sanity_run, record_property):
    sanity_run.join(timeout=1800)
    counts = _counts(sanity_run.junit)
    record_property("csi_sanity", counts)
    print(f"csi-sanity: {counts}")
    assert sanity_run.returncode == 0 and counts["failed"] == 0, \
        f"csi-sanity failed ({counts}); failures:\n{_failures(sanity_run.junit)}\n{sanity_run.output[-3000:]}"
    # What the advertised capabilities make csi-sanity run (v5.6.0: 77, snapshots, clones and expansion
    # included); fewer means specs stopped running.
    assert counts["passed"] >= 77, counts
    # The CSI v1.13 health specs (ControllerGetVolumeHealth 2, ControllerListVolumeHealth 1,
    # NodeGetVolumeHealth 2, NodeGetStorageHealth 1) run, since the capabilities are advertised, and pass.
    health = _health_specs(sanity_run.junit)
    assert sorted(health.values()) == ["passed"] * 6, health


def _counts(junit: Path) -> dict[str, int]:
    root = ET.parse(junit).getroot()
    cases = root.iter("testcase")
    out = {"passed": 0, "failed": 0, "skipped": 0}
    for c in cases:
        if c.find("failure") is not None or c.find("error") is not None:
            out["failed"] += 1
        elif c.find("skipped") is not None or c.get("status") == "skipped":
            out["skipped"] += 1
        else:
            out["passed"] += 1
    return out


def _health_specs(junit: Path) -> dict[str, str]:
    """name -> passed / failed / skipped of every spec whose name mentions a health RPC."""
    out = {}
    for c in ET.parse(junit).getroot().iter("testcase"):
        name = c.get("name") or ""
        if "Health" not in name:
            continue
        if c.find("failure") is not None or c.find("error") is not None:
            out[name] = "failed"
        elif c.find("skipped") is not None or c.get("status") == "skipped":
            out[name] = "skipped"
        else:
            out[name] = "passed"
    return out


def _failures(junit: Path) -> str:
    root = ET.parse(junit).getroot()
    lines = []
    for c in root.iter("testcase"):
        f = c.find("failure")
        if f is None:
            f = c.find("error")
        if f is not None:
            lines.append(f"- {c.get('name')}: {(f.get('message') or f.text or '')[:400]}")
    return "\n".join(lines)
