"""`helm upgrade` from the last tagged release (deploy/releases.txt) to the working tree, as the `installed`
fixture reaches the working tree's chart: the release installed with its own chart and image, a volume attached
and written, then the upgrade in the two halves a rolling upgrade passes through:

1. the new chart and image with the agents left on the release's (agent.updateStrategy OnDelete): the new
   controller and node plugins meet the old agents, the window of every real rollout, in which a new claim is
   made, attached and written;
2. the agents' pods replaced, and a last `helm upgrade` with the plain values (RollingUpdate again: no pod
   template changes, nothing restarts).

What happened is returned as facts that test_release_upgrade.py asserts; the claims made here are deleted
before the scenario starts, so that its counts of LVs, targets and sessions hold."""

from __future__ import annotations

import copy
import sys
import time

from tests.e2e.k8s import driver as drv
from tests.e2e.k8s.driver import NAMESPACE, STATE, TIMINGS

BEFORE = "before-upgrade"      # claim and pod made on the release, attached through the whole upgrade
WINDOW = "during-upgrade"      # claim and pod made by the new controller through the release's agent
# The pod's loop: a line every second, synced, so that a stall or an I/O error shows as a gap or an exit.
TICKER = "i=0; while true; do i=$((i+1)); echo $i $(date +%s) >> /data/ticks; sync; sleep 1; done"


def install_release_then_upgrade(k8s, helm, values: dict, release_image, release_chart, release_tag: str) -> dict:
    """Returns the facts test_release_upgrade.py asserts; every step waits for what it did to be true."""
    from tests.e2e.k8s.test_scenario import pod, pvc, wait_phase
    nodes, storage = len(k8s.nodes), sum(1 for n in k8s.nodes.values() if n.role == "storage")

    def ready(controller_and_node: str, agent: str) -> None:
        """Every pod ready, and on these images only."""
        drv.wait_driver_ready(k8s, nodes, storage, images={"controller": controller_and_node,
                                                           "node": controller_and_node, "agent": agent})

    new = values["image"]
    old_values = copy.deepcopy(values)
    old_values["image"] = {**new, "repository": release_image.repository, "tag": release_image.tag}
    old_ref, new_ref = release_image.ref, f"{new['repository']}:{new['tag']}"
    facts: dict = {"release": release_tag, "old image": old_ref, "new image": new_ref}

    TIMINGS["helm install (last release)"] = drv.helm_install(k8s, helm, old_values, chart=release_chart)
    ready(old_ref, old_ref)
    facts["release chart"] = helm_chart(k8s)
    k8s.apply(pvc(BEFORE))
    k8s.apply(pod(BEFORE, BEFORE, STATE["worker"], f"echo {BEFORE} > /data/marker && sync && {TICKER}"))
    wait_phase(k8s, "pod", BEFORE, "Running")
    k8s.wait_for(lambda: last_tick(k8s) >= 3, 60, "the pod's first ticks")
    facts["container before"] = container(k8s, BEFORE)

    window = copy.deepcopy(values)
    window["agent"]["updateStrategy"] = {"type": "OnDelete", "rollingUpdate": None}
    first = k8s.wait_for(lambda: last_tick(k8s), 60, "the pod's ticks before the upgrade")
    TIMINGS["helm upgrade (agents left on the release)"] = drv.helm_install(k8s, helm, window, upgrade=True)
    ready(new_ref, old_ref)
    facts["images in the window"] = images_by_component(k8s)
    k8s.apply(pvc(WINDOW, storage_class=drv.IMMEDIATE_CLASS))
    wait_phase(k8s, "pvc", WINDOW, "Bound")
    k8s.apply(pod(WINDOW, WINDOW, STATE["worker"], f"echo {WINDOW} > /data/marker && sync && sleep 3600"))
    wait_phase(k8s, "pod", WINDOW, "Running")
    facts["window marker"] = k8s.wait_for(lambda: marker(k8s, WINDOW), 60, "the window pod's marker")
    facts["images of the window's claim"] = images_by_component(k8s)

    t1 = time.monotonic()
    k8s.kubectl(["delete", "pod", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=agent", "--wait=true",
                 "--timeout=120s"])
    ready(new_ref, new_ref)
    TIMINGS["agents replaced -> ready"] = time.monotonic() - t1
    TIMINGS["helm upgrade (plain values)"] = drv.helm_install(k8s, helm, values, upgrade=True)
    ready(new_ref, new_ref)
    upgraded = k8s.wait_for(lambda: last_tick(k8s), 60, "the pod's ticks after the upgrade")
    facts["chart after"] = helm_chart(k8s)
    facts["images after"] = images_by_component(k8s)
    facts["controller nodes after"] = drv.controller_nodes(k8s)
    k8s.wait_for(lambda: last_tick(k8s) >= upgraded + 3, 60, "ticks written after the upgrade")
    facts["ticks"] = [t for t in ticks(k8s) if t[0] >= first]
    facts["upgrade span"] = (first, upgraded)
    facts["container after"] = container(k8s, BEFORE)
    # Read from the volumes, not from what the worker's page cache kept of the writes.
    k8s.nodes[STATE["worker"]].run([sys.executable, "-c", "open('/proc/sys/vm/drop_caches', 'w').write('3')"],
                                   timeout=60, check=True)
    facts["markers after"] = {name: marker(k8s, name) for name in (BEFORE, WINDOW)}

    for name in (BEFORE, WINDOW):
        k8s.kubectl(["delete", "pod", name, "--wait=true", "--timeout=180s"])
        k8s.kubectl(["delete", "pvc", name, "--wait=true", "--timeout=180s"])
    k8s.wait_for(lambda: not k8s.get("pv")["items"] and not k8s.get("volumeattachments")["items"], 180,
                 "the upgrade's volumes gone")
    return facts


def ticks(k8s) -> list[tuple[int, int]]:
    """(count, the pod's unix time) of every line the BEFORE pod wrote."""
    out = k8s.kubectl(["exec", BEFORE, "--", "cat", "/data/ticks"], timeout=120, check=False).stdout
    return [(int(a), int(b)) for a, b in (line.split() for line in out.splitlines() if len(line.split()) == 2)]


def last_tick(k8s) -> int:
    """The last count the BEFORE pod wrote; 0 when it cannot be read (callers wait for more than 0)."""
    written = ticks(k8s)
    return written[-1][0] if written else 0


def marker(k8s, name: str) -> str:
    return k8s.kubectl(["exec", name, "--", "cat", "/data/marker"], timeout=120, check=False).stdout.strip()


def container(k8s, name: str) -> tuple[str, int]:
    """The pod's container ID and restart count."""
    status = k8s.get("pod", name)["status"]["containerStatuses"][0]
    return status["containerID"], status["restartCount"]


def images_by_component(k8s) -> dict[str, list[str]]:
    """The driver container's image of every pod of the release, by component."""
    return {component: sorted(c["image"] for p in pods for c in p["spec"]["containers"]
                              if c["name"] in drv.DRIVER_CONTAINERS)
            for component, pods in drv.driver_pods(k8s).items()}


def helm_chart(k8s) -> str:
    """The chart the release's objects were made from (their helm.sh/chart label), as the CSIDriver carries it."""
    return k8s.get("csidriver", "lvm-iscsi.csi.dev")["metadata"]["labels"]["helm.sh/chart"]
