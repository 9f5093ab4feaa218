"""The benchmark's guest side: run inside a lab node (the host's tree is the guest's root), standard library
and rtslib-fb only (and csi.node.noderecord, where a node record file is found and rewritten). Each sub-command
prints one JSON line.

  raw-create VG POOL LV SIZE IQN PORTAL_IP INITIATOR   the raw floor: the agent's thin lvcreate + the export
                                                       it makes (backstore, target, TPG, LUN 0, portal, ACL
                                                       with CHAP, mapped LUN), done directly; seconds per step
  raw-delete VG LV IQN                                 undo raw-create
  raw-restore VG PORTAL_IP INITIATOR LISTING           a boot's floor: one `vgchange -ay`, then raw-create's
                                                       export of each [lv, iqn] of the JSON file LISTING
  raw-stage IQN PORTAL MKFS MOUNTPOINT                 on a worker, by hand: node record, raw-create's CHAP
                                                       lines written into it, login, the by-path link awaited,
                                                       mkfs.ext4 with the driver's options if MKFS is 1, mount
  raw-unstage IQN MOUNTPOINT                           undo raw-stage: umount, logout, delete the record
  raw-stage-serial PORTAL MOUNTROOT LISTING            raw-stage (with mkfs) of each IQN of the JSON list LISTING,
                                                       one after another: each one's seconds, and the whole
  tcp-recv IP PORT                                     accept one connection, read to EOF: bytes, seconds
  tcp-send IP PORT BYTES                               connect (retrying until the receiver listens), send
  timed CMD ARG...                                     run one command (LVM's, say): its seconds
  recv-file IP PORT PATH                               accept one connection, write it to PATH, fsync: bytes,
                                                       seconds from accept to fsync done
  send-file IP PORT PATH BYTES                         connect (retrying), send the first BYTES of PATH
  send-device IP PORT DEVICE BYTES                     the same, reading the block device with O_DIRECT (as
                                                       LIO's block backstore does: no page cache)
  tcp-echo IP PORT                                     accept one connection; for each 4 KiB received, answer
                                                       48 bytes (an iSCSI response header), until EOF
  tcp-ping IP PORT COUNT                               connect (retrying), COUNT times send 4 KiB and wait for
                                                       the 48 bytes: round-trip mean and p99 in microseconds
"""

import json
import mmap
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

CHUNK = 1 << 20
CHAP_USER = "ubenchraw000000"
CHAP_SECRET = "benchRawChapSecret012345"  # throw-away target in a throw-away lab


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL,
                   env={**os.environ, "LC_ALL": "C"})


def lvcreate_thin(vg, pool, lv, size):
    # The argv of csi.storage.lvm.Lvm.create for a thin volume, with as many tags of about the same length.
    run("lvcreate", "--yes", "--name", lv, "--activate", "y", "--setactivationskip", "n",
        "--addtag", "bench.raw/cluster=raw", "--addtag", "bench.raw/kind=volume",
        "--addtag", f"bench.raw/name={lv}", "--addtag", "bench.raw/request=0123456789abcdef",
        "--virtualsize", f"{size}b", "--thin", f"{vg}/{pool}")


def raw_create(vg, pool, lv, size, iqn, ip, initiator):
    import rtslib_fb as rts  # imported before the clock starts: the agent has it loaded too

    started = time.monotonic()
    lvcreate_thin(vg, pool, lv, size)
    created = time.monotonic()
    _export(rts, vg, lv, iqn, ip, initiator)
    done = time.monotonic()
    return {"lvcreate": created - started, "export": done - created, "total": done - started}


def _export(rts, vg, lv, iqn, ip, initiator):
    """The export the agent makes for a volume: backstore, target, TPG, LUN 0, portal, ACL with CHAP, mapped LUN."""
    so = rts.BlockStorageObject(lv, dev=f"/dev/{vg}/{lv}")
    so.set_attribute("emulate_tpu", "1")
    tpg = rts.TPG(rts.Target(rts.FabricModule("iscsi"), iqn, mode="create"), 1, mode="create")
    tpg.set_attribute("authentication", "1")
    tpg.set_attribute("generate_node_acls", "0")
    tpg.set_attribute("demo_mode_write_protect", "1")
    tpg.set_attribute("cache_dynamic_acls", "0")
    tpg.set_parameter("AuthMethod", "CHAP")
    lun = rts.LUN(tpg, 0, storage_object=so)
    rts.NetworkPortal(tpg, ip, 3260, mode="create")
    tpg.enable = True
    acl = rts.NodeACL(tpg, initiator, mode="create")
    acl.chap_userid = CHAP_USER
    acl.chap_password = CHAP_SECRET
    rts.MappedLUN(acl, 0, tpg_lun=lun, write_protect=False)


def raw_restore(vg, ip, initiator, listing):
    """What a storage node's boot needs without the driver: one activation of the VG (activation skip ignored, as
    the agent's LVs have it set), then the exports of the LVs `listing` names (a JSON list of [lv, iqn])."""
    import rtslib_fb as rts

    with open(listing) as f:
        volumes = json.load(f)
    started = time.monotonic()
    run("vgchange", "--activate", "y", "--ignoreactivationskip", vg)
    activated = time.monotonic()
    for lv, iqn in volumes:
        _export(rts, vg, lv, iqn, ip, initiator)
    done = time.monotonic()
    return {"activate": activated - started, "export": done - activated, "total": done - started}


def _write_chap(noderecord, iqn, portal):
    """raw-create's CHAP lines into the node record, as the driver writes them (not through `iscsiadm -o
    update`: no secret in an argv); a plain write, no fsync."""
    dbs = (Path("/etc/iscsi/nodes"), Path("/var/lib/iscsi/nodes"))
    records = noderecord.record_files(dbs, iqn, portal)
    if not records:
        raise RuntimeError(f"no node record of {iqn} at {portal}")
    for path in records:
        path.write_text(noderecord.rewrite(path.read_text(), noderecord.auth_settings(CHAP_USER, CHAP_SECRET)))


def raw_stage(iqn, portal, mkfs, mountpoint):
    """What a person staging raw-create's export on a worker does (the driver's mkfs.ext4 options)."""
    from csi.node import noderecord  # imported before the clock starts: the node plugin has it loaded too

    device = f"/dev/disk/by-path/ip-{portal}-iscsi-{iqn}-lun-0"
    os.makedirs(mountpoint, exist_ok=True)
    started = time.monotonic()
    run("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-o", "new")
    _write_chap(noderecord, iqn, portal)
    run("iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--login")
    logged_in = time.monotonic()
    while not os.path.exists(device):
        if time.monotonic() - logged_in > 60:
            raise RuntimeError(f"{device} did not appear")
        time.sleep(0.01)
    appeared = time.monotonic()
    if mkfs == "1":
        run("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", device)
    formatted = time.monotonic()
    run("mount", "-t", "ext4", device, mountpoint)
    done = time.monotonic()
    return {"login": logged_in - started, "device": appeared - logged_in, "mkfs": formatted - appeared,
            "mount": done - formatted, "total": done - started}


def raw_stage_serial(portal, mountroot, listing):
    """Many stages by hand on one worker, as a person's loop would run them: the lab's own rate of stages."""
    with open(listing) as f:
        iqns = json.load(f)
    started = time.monotonic()
    each = [raw_stage(iqn, portal, "1", os.path.join(mountroot, str(i)))["total"] for i, iqn in enumerate(iqns)]
    return {"stages": each, "total": time.monotonic() - started}


def raw_unstage(iqn, mountpoint):
    started = time.monotonic()
    run("umount", mountpoint)
    run("iscsiadm", "-m", "node", "-T", iqn, "--logout")
    run("iscsiadm", "-m", "node", "-T", iqn, "-o", "delete")
    return {"total": time.monotonic() - started}


def raw_create_serial(vg, pool, prefix, count, size):
    """LVM's own serial rate: `count` thin LVs made one after another, with the agent's argv shape."""
    started = time.monotonic()
    for i in range(int(count)):
        lvcreate_thin(vg, pool, f"{prefix}-{i}", size)
    return {"total": time.monotonic() - started}


def raw_remove_serial(vg, prefix, count):
    run("lvremove", "--yes", *(f"{vg}/{prefix}-{i}" for i in range(int(count))))
    return {}


def raw_delete(vg, lv, iqn):
    import rtslib_fb as rts

    try:
        rts.Target(rts.FabricModule("iscsi"), iqn, mode="lookup").delete()
    except rts.RTSLibNotInCFSError:
        pass
    try:
        rts.BlockStorageObject(lv).delete()
    except rts.RTSLibNotInCFSError:
        pass
    run("lvremove", "--yes", f"{vg}/{lv}")
    return {}


def tcp_recv(ip, port):
    with socket.create_server((ip, int(port))) as server:
        conn, _ = server.accept()
        with conn:
            started = time.monotonic()  # the sender has its data ready before it connects
            view = memoryview(bytearray(CHUNK))
            total = 0
            while n := conn.recv_into(view):
                total += n
            return {"bytes": total, "seconds": time.monotonic() - started}


def _connect(ip, port):
    deadline = time.monotonic() + 30
    while True:
        try:
            return socket.create_connection((ip, int(port)), timeout=10)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def tcp_send(ip, port, size):
    chunk = os.urandom(CHUNK)
    sock = _connect(ip, port)
    left, view = int(size), memoryview(chunk)
    with sock:
        sock.settimeout(None)
        while left > 0:
            sock.sendall(view[:min(left, CHUNK)])
            left -= CHUNK
    return {}


def timed(*argv):
    started = time.monotonic()
    run(*argv)
    return {"seconds": time.monotonic() - started}


def recv_file(ip, port, path):
    with socket.create_server((ip, int(port))) as server:
        conn, _ = server.accept()
        with conn, open(path, "r+b", buffering=0) as out:
            started = time.monotonic()
            view = memoryview(bytearray(CHUNK))
            total = 0
            while n := conn.recv_into(view):
                out.write(view[:n])
                total += n
            os.fsync(out.fileno())
            return {"bytes": total, "seconds": time.monotonic() - started}


def send_file(ip, port, path, size):
    left = int(size)
    with _connect(ip, port) as sock, open(path, "rb", buffering=0) as src:
        sock.settimeout(None)
        while left > 0:
            data = src.read(min(left, CHUNK))
            if not data:
                break
            sock.sendall(data)
            left -= len(data)
    return {}


def send_device(ip, port, path, size):
    left = int(size)
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with _connect(ip, port) as sock:
            sock.settimeout(None)
            while left > 0:
                n = os.readv(fd, [buf])
                if n <= 0:
                    break
                sock.sendall(memoryview(buf)[:min(n, left)])
                left -= n
    finally:
        os.close(fd)
    return {}


PING, PONG = 4096, 48


def _exactly(conn, n):
    view, got = memoryview(bytearray(n)), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            return False
        got += k
    return True


def tcp_echo(ip, port):
    with socket.create_server((ip, int(port))) as server:
        conn, _ = server.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # as LIO and open-iscsi set it
            answered = 0
            while _exactly(conn, PING):
                conn.sendall(bytes(PONG))
                answered += 1
            return {"answered": answered}


def tcp_ping(ip, port, count):
    data, times = os.urandom(PING), []
    with _connect(ip, port) as sock:
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(int(count)):
            started = time.perf_counter()
            sock.sendall(data)
            if not _exactly(sock, PONG):
                raise OSError("the echo side closed the connection")
            times.append(time.perf_counter() - started)
    times.sort()
    return {"mean_us": sum(times) / len(times) * 1e6, "p99_us": times[int(len(times) * 0.99) - 1] * 1e6}


COMMANDS = {"raw-create": raw_create, "raw-delete": raw_delete, "raw-restore": raw_restore, "tcp-recv": tcp_recv,
            "raw-stage": raw_stage, "raw-unstage": raw_unstage, "raw-stage-serial": raw_stage_serial,
            "raw-create-serial": raw_create_serial, "raw-remove-serial": raw_remove_serial,
            "tcp-send": tcp_send, "timed": timed, "recv-file": recv_file, "send-file": send_file,
            "send-device": send_device, "tcp-echo": tcp_echo, "tcp-ping": tcp_ping}

if __name__ == "__main__":
    print(json.dumps(COMMANDS[sys.argv[1]](*sys.argv[2:])), flush=True)
