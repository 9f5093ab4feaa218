"""A TCP forwarder between two network namespaces, in threads of the calling process.

Lab.expose (host loopback -> a node) and Lab.publish (the lab's host address -> host loopback) use it. Both
ends stay on this machine: one side is always a loopback address outside the lab namespace, the other an
address inside it.
"""

import socket
import threading

from . import netns


class Forwarder:
    def __init__(self, listen_ns: int, listen: tuple[str, int], target_ns: int, target: tuple[str, int]):
        self.target_ns = target_ns
        self.target = target
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = netns.socket_in(listen_ns)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(listen)
        self._listener.listen(64)
        self.address = self._listener.getsockname()
        self._thread = threading.Thread(target=self._accept, name=f"lab-forward-{self.address[1]}", daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = netns.connect_in(self.target_ns, self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._serve, args=(client, upstream), daemon=True).start()

    def _serve(self, client: socket.socket, upstream: socket.socket):
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self._lock:
            self._conns.difference_update((client, upstream))
        client.close()
        upstream.close()

    def close(self):
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the thread; close() alone does not
        except OSError:
            pass
        self._listener.close()
        self._thread.join(timeout=5)
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _pump(src: socket.socket, dst: socket.socket):
    """Copy one direction until end of file, then pass the end of file on."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass
