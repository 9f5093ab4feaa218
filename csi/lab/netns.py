"""Network namespaces: made and removed with ip(8); sockets and threads moved into one with setns(2).

setns(CLONE_NEWNET) moves only the calling thread, and a socket stays in the namespace it was created in.
So the lab reaches its nodes from any thread of an unmoved process by creating the socket inside the
namespace (socket_in) and switching the thread straight back; and a process that wants to live in the
namespace as a whole (enter) must do it before it starts threads, since threads that already exist stay
where they were, while new ones inherit the namespace of the thread that creates them.
"""

import contextlib
import ctypes
import os
import socket

from .common import LabError, run_host

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"
_libc = ctypes.CDLL(None, use_errno=True)


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def create(name: str) -> None:
    run_host(["ip", "netns", "add", name])
    run_host(["ip", "-n", name, "link", "set", "lo", "up"])


def pids(name: str) -> list[int]:
    done = run_host(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def delete(name: str) -> None:
    if exists(name):
        run_host(["ip", "netns", "del", name])


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LabError(f"setns: {os.strerror(err)}")


def current_fd() -> int:
    """An fd on the calling thread's network namespace (the caller closes it)."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY)


@contextlib.contextmanager
def inside(ns_fd: int):
    """Run the body with the calling thread in the namespace ns_fd; only this thread moves, and it moves back."""
    own = current_fd()
    try:
        setns(ns_fd)
        try:
            yield
        finally:
            setns(own)
    finally:
        os.close(own)


def socket_in(ns_fd: int, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    with inside(ns_fd):
        return socket.socket(family, kind)


def connect_in(ns_fd: int, addr: tuple[str, int], timeout: float) -> socket.socket:
    sock = socket_in(ns_fd)
    sock.settimeout(timeout)
    try:
        sock.connect(addr)
    except OSError:
        sock.close()
        raise
    return sock
