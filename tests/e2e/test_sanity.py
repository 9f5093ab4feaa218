"""csi-sanity (kubernetes-csi/csi-test, built from the Go module proxy by scripts/build-go-tools) against the
real controller and node plugin: a storage node and a worker in UML.

Every spec for the advertised capabilities must pass; specs csi-sanity skips (capabilities not advertised,
such as snapshots and expansion) are reported, not counted as passes.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from csi.lab import Lab, preflight
from csi.lab.deploy import Deployment

pytestmark = pytest.mark.e2e

CACHE = Path(os.environ.get("CSI_CACHE", "/var/cache/lvm-iscsi-csi"))
SANITY = CACHE / "bin" / "csi-sanity"


def test_csi_sanity(tmp_path_factory, record_property):
    problem = preflight()
    if problem:
        pytest.fail(f"e2e tests need User-Mode Linux: {problem}", pytrace=False)
    if not SANITY.exists():
        pytest.fail(f"{SANITY} is missing: run scripts/setup (it builds csi-sanity from the Go module proxy)",
                    pytrace=False)
    workdir = tmp_path_factory.mktemp("sanity")
    with Lab(workdir, name=f"san{os.getpid() % 100000}", subnet="10.213.2") as lab:
        s1 = lab.add_node("storage-1", role="storage", disk_bytes=4 << 30)
        w = lab.add_node("worker-1", role="worker")
        lab.boot_all(timeout=180)
        d = Deployment(lab, cluster_id="sanity", zones={"storage-1": "zone-a", "worker-1": "zone-a"})
        d.start_agent(s1)
        node_target = d.start_node_plugin(w)
        d.start_controller([s1])
        kubelet = d.kubelet_dir(w)
        junit = workdir / "junit.xml"
        argv = [str(SANITY), f"--csi.endpoint={node_target}", f"--csi.controllerendpoint={d.controller_target}",
                f"--csi.stagingdir={kubelet}/sanity-staging", f"--csi.mountdir={kubelet}/sanity-mount",
                "--csi.testvolumesize=67108864", "--csi.testvolumeexpandsize=134217728",
                f"--ginkgo.junit-report={junit}", "--ginkgo.timeout=20m", "--ginkgo.no-color"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=1500)
        (workdir / "csi-sanity.log").write_text(r.stdout + r.stderr)
        counts = _counts(junit)
        record_property("csi_sanity", counts)
        print(f"csi-sanity: {counts}")
        assert r.returncode == 0 and counts["failed"] == 0, \
            f"csi-sanity failed ({counts}); failures:\n{_failures(junit)}\n{r.stdout[-3000:]}"
        # What the advertised capabilities make csi-sanity run (v5.6.0: 77, snapshots, clones and expansion
        # included); fewer means specs stopped running.
        assert counts["passed"] >= 77, counts
        # The CSI v1.13 health specs (ControllerGetVolumeHealth 2, ControllerListVolumeHealth 1,
        # NodeGetVolumeHealth 2, NodeGetStorageHealth 1) run, since the capabilities are advertised, and pass.
        health = _health_specs(junit)
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
