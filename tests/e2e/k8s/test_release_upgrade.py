"""Issue 16: `helm upgrade` from the last tagged release (deploy/releases.txt) to the working tree, with volumes
attached. The `installed` fixture does it (upgrade.py: the release's chart and image, a pod writing to its
volume, the upgrade with the agents left on the release, a claim made in that window, the agents replaced);
these tests assert what it saw. The scenario after this module runs on the upgraded install: new claims there
are made after the upgrade."""

from __future__ import annotations

import pytest
import yaml

from tests.e2e.k8s import release, upgrade
from tests.e2e.k8s.driver import CHART, CONTROLLER_REPLICAS, STATE

pytestmark = pytest.mark.e2e

# A second without a tick is a second the pod's writes waited; the lab's one-CPU worker, busy starting the new
# node plugin, has been seen to stretch `sleep 1` to a few seconds. A stalled volume would stop the ticks for the
# replacement's whole duration (over a minute), an I/O error end them.
MAX_TICK_GAP = 20


def test_the_last_release_was_installed_with_its_own_chart_and_image(installed):
    facts, last = STATE["upgrade"], release.last_release()
    assert facts["release"] == last.tag
    assert facts["release chart"] == f"lvm-iscsi-csi-{last.version}"
    assert facts["old image"].endswith(f":{last.tag}") and facts["old image"] != facts["new image"]
    working = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert facts["chart after"] == f"lvm-iscsi-csi-{working}"
    assert release.semver_key(working) > release.semver_key(last.version)


def test_new_controller_and_node_plugins_serve_a_new_claim_through_the_release_agent(installed):
    """The rollout's window: the claim made, attached and written by the new controller and node plugin while
    the storage node's agent still ran the release's image."""
    facts = STATE["upgrade"]
    old, new = facts["old image"], facts["new image"]
    window = {"controller": [new] * CONTROLLER_REPLICAS, "node": [new] * 2, "agent": [old]}
    assert facts["images in the window"] == window
    assert facts["images of the window's claim"] == window
    assert facts["window marker"] == upgrade.WINDOW


def test_a_volume_attached_before_the_upgrade_stays_attached_and_written(installed):
    facts = STATE["upgrade"]
    before, after = facts["container before"], facts["container after"]
    assert after == before and after[1] == 0, (before, after)
    counts = [count for count, _ in facts["ticks"]]
    first, upgraded = facts["upgrade span"]
    # every second of the upgrade written, in order, by the same loop (a restart would start again at 1)
    assert counts == list(range(counts[0], counts[0] + len(counts))), counts
    assert counts[0] <= first and counts[-1] >= upgraded + 3, (counts[0], counts[-1], facts["upgrade span"])
    times = [t for _, t in facts["ticks"]]
    gaps = [b - a for a, b in zip(times, times[1:])]
    print(f"\nticks through the upgrade: {len(counts)} over {times[-1] - times[0]} s, longest gap {max(gaps)} s")
    assert max(gaps) <= MAX_TICK_GAP, gaps
    assert facts["markers after"] == {upgrade.BEFORE: upgrade.BEFORE, upgrade.WINDOW: upgrade.WINDOW}
    new = facts["new image"]
    assert facts["images after"] == {"controller": [new] * CONTROLLER_REPLICAS, "node": [new] * 2, "agent": [new]}


def test_the_rollout_leaves_one_controller_replica_on_each_node(installed):
    """Each rolled revision's replicas spread over the nodes (the chart's topology spread constraint): with both on
    one node, that node's loss would take the whole control plane (the replicated scenario cuts one's power)."""
    nodes = STATE["upgrade"]["controller nodes after"]
    assert len(nodes) == CONTROLLER_REPLICAS and len(set(nodes)) == CONTROLLER_REPLICAS, nodes
