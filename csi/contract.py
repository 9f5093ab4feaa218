"""The contract between controller and node plugin: what ControllerPublishVolume puts in publish_context, and
how NodeStageVolume reads it. Both sides import this module; nothing else names these keys.

publish_context lands in the VolumeAttachment's status.attachmentMetadata, which anyone who can read
VolumeAttachments (or the cluster's Prometheus: kube-state-metrics exports the keys as labels) can read. So it
holds where to log in and whom to ask for the credentials, never a secret: the node plugin fetches its CHAP
credentials from the storage node's agent over mutual TLS with its own node certificate (storage/access.py
gives them only to the node the grant was made for).

A replicated volume (volume_id "r1:<lv>") publishes one such set of keys per leg, prefixed "leg0." and "leg1.",
with each leg's VG and whether the controller's record holds it outdated (it missed writes the other leg has):
parse_replicated() reads them. Every leg of the volume is there, in the record's order: a leg whose storage node
did not answer at publish has only its node, VG and state, and "granted" false (the node cannot log in to it,
but knows it exists: a lone leg is trusted only when it is provably current, csi/node/replicated.py). A volume
made from a snapshot or a clone of a replicated volume names its "seed" leg: the one that holds the source's
data under the source array's superblock, from which the node creates the volume's own array at its first stage.

Kubernetes never changes a VolumeAttachment's publish_context: when an operator replaces a leg on another storage
node, a worker running the volume learns the new leg from the other leg's agent instead (GetPeerLeg), checked
here by peer_leg() as a leg of publish_context is.

A VolumeAttachment made by the driver before this contract holds the CHAP secrets themselves (chapUser,
chapSecret, mutualChapUser, mutualChapSecret) and no agent address: parse() still reads those, so a volume
attached across the upgrade still stages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from csi import errors, ids
from csi.storage.lio import Portal

TARGET_IQN = "targetIqn"
PORTALS = "portals"
LUN = "lun"
STORAGE_NODE = "storageNode"
AGENT = "agent"              # host:port of the storage node's agent: where the credentials are
# Written by the driver before this contract (secrets in a Kubernetes object); read, never written.
LEGACY_CHAP_USER = "chapUser"
LEGACY_CHAP_SECRET = "chapSecret"
LEGACY_MUTUAL_USER = "mutualChapUser"
LEGACY_MUTUAL_SECRET = "mutualChapSecret"

_CHAP_VALUE = re.compile(r"[!-~]{1,255}")


@dataclass(frozen=True)
class Chap:
    user: str
    secret: str
    mutual_user: str = ""
    mutual_secret: str = ""


@dataclass(frozen=True)
class Attachment:
    """What a node needs to log in to one volume's target."""
    iqn: str
    portals: tuple[str, ...]
    lun: int
    storage_node: str
    agent: str                       # "" in a context of the driver before this contract
    legacy_chap: Chap | None = None  # only in such a context


def publish_context(target_iqn: str, portals, lun: int, storage_node: str, agent_address: str) -> dict[str, str]:
    return {TARGET_IQN: target_iqn, PORTALS: ",".join(portals), LUN: str(lun), STORAGE_NODE: storage_node,
            AGENT: agent_address}


REPLICAS = "replicas"
LEG_VG = "vg"
LEG_OUTDATED = "outdated"
LEG_GRANTED = "granted"
SEED = "seedLeg"
MAX_LEGS = 2


@dataclass(frozen=True)
class Leg:
    """One leg of a replicated volume on a node: where its LV is (for its credentials) and its target, None when
    it was not granted (its storage node did not answer at publish)."""
    index: int
    storage_node: str
    vg: str
    lv: str
    outdated: bool
    attachment: Attachment | None
    seed: bool = False      # holds the data of the volume's source, under the source array's superblock
    replaces: tuple[str, ...] = ()   # peer_leg(): the storage nodes whose leg at this index it superseded

    @property
    def ref(self) -> ids.LvRef:
        return ids.LvRef(self.storage_node, self.vg, self.lv)


def leg_prefix(index: int) -> str:
    return f"leg{index}."


def replicated_publish_context(legs: list[tuple[dict[str, str] | None, str, str, bool]],
                                seed: int | None = None) -> dict[str, str]:
    """legs, in the record's order: (publish_context() of the leg's grant, None when not granted; its storage
    node; its VG; outdated); seed: the index of the seed leg of a volume made from a replicated source."""
    out = {REPLICAS: str(len(legs))}
    if seed is not None:
        out[SEED] = str(seed)
    for i, (ctx, node, vg, outdated) in enumerate(legs):
        p = leg_prefix(i)
        out.update({p + k: v for k, v in (ctx or {}).items()})
        out[p + STORAGE_NODE] = node
        out[p + LEG_VG] = vg
        out[p + LEG_OUTDATED] = str(outdated).lower()
        out[p + LEG_GRANTED] = str(ctx is not None).lower()
    return out


def parse_replicated(ctx, key: str) -> list[Leg]:
    """The legs of replicated volume `key` that publish_context describes, each checked as parse() checks a
    plain volume's context (its target must be its LV's)."""
    count = ctx.get(REPLICAS, "")
    # Every leg, always: a context naming fewer would let a lone leg pass for the whole volume.
    if count != str(MAX_LEGS):
        raise errors.invalid(f"publish_context of a replicated volume needs {REPLICAS}={MAX_LEGS} "
                             "(was the volume published by this driver's controller?)")
    seed = ctx.get(SEED)
    if seed is not None and seed not in [str(i) for i in range(MAX_LEGS)]:
        raise errors.invalid(f"publish_context {SEED} must name a leg (0 to {MAX_LEGS - 1})")
    legs = []
    for i in range(int(count)):
        p = leg_prefix(i)
        sub = {k[len(p):]: v for k, v in ctx.items() if k.startswith(p)}
        vg = sub.get(LEG_VG, "")
        if not vg or not sub.get(STORAGE_NODE):
            raise errors.invalid(f"publish_context leg {i} lacks its VG or storage node")
        ref = ids.LvRef(sub[STORAGE_NODE], vg, key)
        if ids.parse_id(ref.encode()) is None:
            raise errors.invalid(f"publish_context leg {i} names no valid storage node and VG")
        for flag in (LEG_OUTDATED, LEG_GRANTED):
            if sub.get(flag, "true" if flag == LEG_GRANTED else "false") not in ("true", "false"):
                raise errors.invalid(f"publish_context leg {i}: {flag} must be true or false")
        granted = sub.get(LEG_GRANTED, "true") == "true"
        legs.append(Leg(i, ref.node, vg, key, sub.get(LEG_OUTDATED) == "true", parse(sub, ref) if granted else None,
                        seed == str(i)))
    if len({leg.storage_node for leg in legs}) != len(legs):
        raise errors.invalid("publish_context names one storage node for two legs")
    return legs


def peer_leg(location, key: str) -> Leg:
    """A leg of replicated volume `key` as an agent tells where it is now (agent.proto LegLocation, after an
    operator replaced a leg: csi/legreplace.py), checked as a leg of publish_context is. A storage node lying
    here can name nothing but an LV of this volume's name that the controller granted to the asking node."""
    if not 0 <= location.index < MAX_LEGS:
        raise errors.invalid(f"a leg's index must be from 0 to {MAX_LEGS - 1}")
    ref = ids.LvRef(location.storage_node, location.vg, key)
    if not location.storage_node or not location.vg or ids.parse_id(ref.encode()) is None:
        raise errors.invalid("a leg's location names no valid storage node and VG")
    ctx = publish_context(location.target_iqn, location.portals, location.lun, location.storage_node,
                          location.agent)
    if not location.agent:
        raise errors.invalid("a leg's location names no agent")
    return Leg(location.index, ref.node, ref.vg, key, location.outdated, parse(ctx, ref),
               replaces=tuple(location.replaces))


def check_chap(chap: Chap) -> Chap:
    # iscsiadm's node records are "name = value" lines: a value with a newline would add a setting.
    if any(v and not _CHAP_VALUE.fullmatch(v) for v in (chap.user, chap.secret, chap.mutual_user,
                                                          chap.mutual_secret)):
        raise errors.invalid("CHAP values must be 1 to 255 printable ASCII characters, no spaces")
    return chap


def parse(ctx, ref: ids.LvRef) -> Attachment:
    """The target publish_context describes, checked: it must be this volume's, on ip:port portals."""
    missing = [k for k in (TARGET_IQN, PORTALS, LUN) if not ctx.get(k)]
    if missing:
        raise errors.invalid(f"publish_context lacks {', '.join(missing)} (was the volume published by this "
                             "driver's controller?)")
    if ctx[TARGET_IQN] != ref.iqn:
        raise errors.invalid("publish_context names another target than the volume")
    lun = ctx[LUN]
    if not re.fullmatch(r"[0-9]{1,5}", lun) or int(lun) > 16383:
        raise errors.invalid("publish_context lun must be a number from 0 to 16383")
    try:
        portals = tuple(str(Portal.parse(p)) for p in ctx[PORTALS].split(",") if p)
    except ValueError:
        raise errors.invalid("publish_context portals must be ip:port items") from None
    if not portals:
        raise errors.invalid("publish_context names no portal")
    node = ctx.get(STORAGE_NODE, ref.node)
    if node != ref.node:
        raise errors.invalid("publish_context names another storage node than the volume")
    agent = ctx.get(AGENT, "")
    if agent:
        try:
            Portal.parse(agent)   # the same shape: ip:port
        except ValueError:
            raise errors.invalid("publish_context agent must be an ip:port") from None
    legacy = None
    if ctx.get(LEGACY_CHAP_USER) or ctx.get(LEGACY_CHAP_SECRET):
        legacy = check_chap(Chap(ctx.get(LEGACY_CHAP_USER, ""), ctx.get(LEGACY_CHAP_SECRET, ""),
                                 ctx.get(LEGACY_MUTUAL_USER, ""), ctx.get(LEGACY_MUTUAL_SECRET, "")))
    if not agent and legacy is None:
        raise errors.invalid("publish_context names neither the storage node's agent nor credentials")
    return Attachment(ctx[TARGET_IQN], portals, int(lun), node, agent, legacy)
