"""A lab of throw-away User-Mode Linux nodes on a private network, for the e2e tests and the demo.

The host kernel has no device-mapper, LIO or iSCSI initiator; a UML kernel (Debian's user-mode-linux,
an ordinary process) has them all. Each node boots with the host's / as its root over hostfs, mounted
read-only: the project's venv and the host's tools are there, and nothing a node does reaches the host's
/etc, /var or /run. /etc and /var are overlays with a per-node tmpfs on top (so /etc/target, /etc/iscsi,
/etc/lvm/{archive,backup}, /var/lib/iscsi are each node's own), /run and /tmp are tmpfs, and the lab's
workdir is the one host path a node can write, at the same path as on the host (disk images, logs, and
whatever a test wants to keep across a reboot, e.g. the agent's records under node.workdir).

    from csi.lab import Lab

    with Lab(workdir, name="demo") as lab:       # netns "csilab-demo", bridge, host side <subnet>.1/24
        s1 = lab.add_node("storage-1", role="storage", disk_bytes=4 << 30)   # <subnet>.11, .12, ...
        w1 = lab.add_node("worker-1", role="worker")                          # <subnet>.21, ...
        lab.boot_all(timeout=120)
        s1.run(["lvs", "--reportformat", "json"], timeout=30)           # GuestResult(rc, stdout, stderr)
        s1.spawn("agent", [python, "-m", "csi", "agent", ...], env={...}) # log: s1.log_path("agent")
        s1.signal("agent", 9); s1.wait_exit("agent")
        s1.reboot()                                                      # power cut, boot again
    # on exit (also after errors): nodes, forwarders, processes in the netns, the netns itself (with the
    # bridge and the veths) and the disk images are gone; console.log and process logs stay in workdir/<node>/.

Every node: hostname and IP, its own machine-id and MAC, udev, iscsid with initiator IQN
iqn.2026-11.dev.csi.lvm-iscsi.lab:<node> (node.initiator_iqn), modules for dm-thin, LIO and iscsi_tcp.
Storage nodes: VG "csi-vg" on a loop device over workdir/<node>/disk.img (sparse, kept across reboot) with
a thin pool "csi-vg/thinpool" of 60 % of the VG; the rest is for thick LVs. LVM in every node reads
/etc/lvm/lvmlocal.conf written at boot: it scans loop devices only, activates nothing by itself after a
reboot (activation is the agent's job), and runs without dmeventd and lvmpolld.

The network: a Linux bridge csilab0 in the namespace (the host side, <subnet>.1), and per node a veth pair
whose free end UML's vector driver reads and writes (raw socket, receive coalescing on, segmentation
offload off: see guest-init.sh); UML runs inside the namespace for that.

Reaching the nodes: their addresses exist only in the lab's network namespace. The lab itself talks to
guestd (TCP <ip>:7000) with sockets created inside the namespace, so the calling process can stay where it
is. For other host programs there are three ways in:
  lab.popen_in_netns(argv, ...)   a host process inside the namespace (e.g. the CSI controller);
  lab.enter() / lab.leave()       move the calling thread; do it before any gRPC channel or thread exists;
  lab.expose(ip, port) -> port    127.0.0.1:<port> on the host forwards to <ip>:<port> in the lab;
  lab.publish(port, to_port)      <host_ip>:<port> in the lab forwards to 127.0.0.1:<to_port> on the host.
"""

from .common import GuestResult, LabError
from .lab import Lab, preflight, reap_stale
from .node import IQN_PREFIX, VG_NAME, LabNode

__all__ = ["Lab", "LabNode", "LabError", "GuestResult", "preflight", "reap_stale", "IQN_PREFIX", "VG_NAME"]
