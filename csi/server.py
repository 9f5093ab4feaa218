"""gRPC plumbing shared by every role: endpoints, TLS, the one interceptor, per-ID locks.

The interceptor is the only place that logs calls and turns exceptions into statuses: servicers just raise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf.message import Message

from csi import errors
from csi.runner import deadline

log = logging.getLogger(__name__)

SECRET_WORDS = ("secret", "password")
MAX_MESSAGE = 1024


# ---------------------------------------------------------------------------------------------- endpoints

def listen_address(endpoint: str) -> str:
    """`unix:///path` or `unix:/path` or `tcp://host:port` or `host:port` -> a gRPC bind address."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    else:
        return endpoint[len("tcp://"):] if endpoint.startswith("tcp://") else endpoint
    if not path.startswith("/"):
        raise ValueError(f"unix endpoint needs an absolute path: {endpoint}")
    return "unix:" + path


def remove_stale_socket(endpoint: str) -> None:
    address = listen_address(endpoint)
    if address.startswith("unix:"):
        path = Path(address[len("unix:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


TLS_NAMES = ("ca.crt", "tls.crt", "tls.key")


@dataclass(frozen=True)
class TlsFiles:
    """ca.crt, tls.crt, tls.key in one directory: the layout of a Kubernetes TLS secret plus its CA.

    The files may be replaced while a process runs (a certificate renewed, csi/certkeeper.py; a Secret updated
    by kubelet): servers made with server_credentials() present the new ones from the next connection on, and
    clients compare version() to know when to make new channels. A key that does not match its certificate
    (read between two replaced files) is refused, and the previous files stay in use until both are there."""
    directory: Path

    def version(self) -> tuple:
        """What the files are now (inode, size, modification time of each): cheap, changes when any is
        replaced, whether by a rename (csi/fsutil.write_atomic) or by kubelet's swap of a Secret's directory."""
        out = []
        for name in TLS_NAMES:
            try:
                st = os.stat(self.directory / name)
            except OSError:
                out.append(None)
                continue
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(out)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) as PEM; ValueError when a file is missing, or the key is not the certificate's."""
        try:
            ca, cert, key = ((self.directory / n).read_bytes() for n in TLS_NAMES)
        except OSError as exc:
            raise ValueError(f"TLS directory {self.directory}: {exc}") from None
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        from csi import pki
        try:
            matching = pki.matches(load_pem_private_key(key, None), x509.load_pem_x509_certificate(cert))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"TLS directory {self.directory}: {exc}") from None
        if not matching:
            raise ValueError(f"TLS directory {self.directory}: tls.key is not the key of tls.crt (being replaced?)")
        return ca, cert, key

    def server_credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS that follows the files: gRPC asks before every handshake, and gets new certificates once
        the files changed (a stat of three files per new connection; existing connections keep theirs)."""
        def config():
            ca, cert, key = self.read()
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

        state = {"version": self.version()}
        initial = config()

        def fetch():
            now = self.version()
            if now == state["version"]:
                return None
            try:
                changed = config()
            except Exception as exc:  # noqa: BLE001 - a failing fetch must not fail the handshake: keep the old
                log.warning("not using the new TLS files yet: %s", exc)
                return None
            state["version"] = now
            log.info("the TLS files in %s changed: new connections get the new certificate", self.directory)
            return changed

        return grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The files as they are now: a client that keeps a channel compares version() to know when to make
        a new one (csi/controller/agents.py)."""
        ca, cert, key = self.read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


# ---------------------------------------------------------------------------------------------- logging

def redact(message: Message) -> str:
    """The message as one log line with every secret field and secret-looking map entry replaced."""
    clone = type(message)()
    clone.CopyFrom(message)
    _redact(clone)
    return str(clone).replace("\n", " ").strip()


def _redact(message: Message) -> None:
    for field, value in message.ListFields():
        if _is_secret_field(field):
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                keys = list(value)
                message.ClearField(field.name)
                for key in keys:
                    getattr(message, field.name)[key] = "***"
            elif field.type == field.TYPE_STRING and not _repeated(field):
                setattr(message, field.name, "***")
            else:
                message.ClearField(field.name)
            continue
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key in list(value):
                if value_field.message_type is not None:
                    _redact(value[key])
                elif any(w in key.lower() for w in SECRET_WORDS):
                    value[key] = "***"
        elif _repeated(field):
            for item in value:
                _redact(item)
        else:
            _redact(value)


def _repeated(field: _descriptor.FieldDescriptor) -> bool:
    # protobuf >= 6 has is_repeated; `label` is gone in 7
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


def short(message: str, limit: int = MAX_MESSAGE) -> str:
    """Bounds a status message or log line that may echo what a client sent (an ID of a megabyte, say)."""
    return message if len(message) <= limit else message[:limit] + f"... ({len(message) - limit} more characters)"


def _is_secret_field(field: _descriptor.FieldDescriptor) -> bool:
    if any(w in field.name.lower() for w in SECRET_WORDS):
        return True
    for ext, val in field.GetOptions().ListFields():
        if ext.name == "csi_secret" and val:
            return True
    return False


def _safe_redact(message: Message) -> str:
    """Logging must never fail a call: a message that cannot be redacted is not logged at all."""
    try:
        return short(redact(message), 4096)
    except Exception as exc:  # noqa: BLE001
        return f"<not logged: {type(exc).__name__}>"


# ---------------------------------------------------------------------------------------------- interceptor

class CallInterceptor(grpc.ServerInterceptor):
    """Logs every call (method + duration at info, redacted request at debug), gives the runner the call's
    deadline, asks `authorize(method, request, context)` (when given) before the call does anything, and maps
    every exception to a status through errors.status_of. With `metrics` (csi/metrics.py RpcMetrics), every
    call is counted and timed by the status its client got, refused and failed calls included."""

    def __init__(self, authorize: Callable[[str, object, object], None] | None = None, metrics=None):
        self._authorize = authorize
        self._metrics = metrics

    def _observe(self, full_method: str, code: grpc.StatusCode, started: float) -> None:
        if self._metrics is not None:
            try:
                self._metrics.observe(full_method, code, time.monotonic() - started)
            except Exception:  # noqa: BLE001 - counting must never fail a call
                log.exception("cannot record the metrics of %s", full_method)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        full_method = handler_call_details.method
        method = full_method.rsplit("/", 1)[-1]
        if handler.unary_stream is not None:
            return self._stream(handler, full_method, method)
        if handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def call(request, context):
            started = time.monotonic()
            code = grpc.StatusCode.DEADLINE_EXCEEDED   # what _refuse_expired answers
            try:
                _refuse_expired(method, context)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s request: %s", method, _safe_redact(request))
                try:
                    if self._authorize is not None:
                        self._authorize(method, request, context)
                    with deadline(context.time_remaining()):
                        response = inner(request, context)
                except Exception as exc:  # noqa: BLE001 - this is the one place that maps every error
                    code, message = errors.status_of(exc)
                    message = short(message)
                    level = logging.ERROR if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) \
                        else logging.INFO
                    log.log(level, "%s failed after %.3fs: %s %s", method, time.monotonic() - started, code.name,
                            message, exc_info=level == logging.ERROR and not isinstance(exc, errors.CsiError))
                    context.abort(code, message)
                code = grpc.StatusCode.OK
            finally:
                self._observe(full_method, code, started)
            log.info("%s ok in %.3fs", method, time.monotonic() - started)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s response: %s", method, _safe_redact(response))
            return response

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


    def _stream(self, handler, full_method: str, method: str):
        inner = handler.unary_stream

        def call(request, context):
            started = time.monotonic()
            # A stream its client cancels half-way ends here with GeneratorExit: counted as CANCELLED.
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            try:
                _refuse_expired(method, context)
                code = grpc.StatusCode.CANCELLED
                try:
                    if self._authorize is not None:
                        self._authorize(method, request, context)
                    with deadline(context.time_remaining()):
                        yield from inner(request, context)
                except Exception as exc:  # noqa: BLE001 - as for unary calls
                    code, message = errors.status_of(exc)
                    message = short(message)
                    log.log(logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO,
                            "%s stream failed after %.3fs: %s %s", method, time.monotonic() - started, code.name,
                            message)
                    context.abort(code, message)
                code = grpc.StatusCode.OK
            finally:
                self._observe(full_method, code, started)
            log.info("%s stream done in %.3fs", method, time.monotonic() - started)

        return grpc.unary_stream_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _refuse_expired(method: str, context) -> None:
    """A call whose deadline passed while it waited for a worker thread (many calls at once) is not started:
    its client has given up and will retry, and every command it ran would get only the runner's floor of
    seconds, which kills commands half-way (an iscsiadm writing a node record, an lvcreate) and leaves work
    for the retry. Seen with 100 volumes at once (tests/e2e/test_load.py): such stages ran on for a minute, then
    failed, and left truncated iSCSI node records behind."""
    left = context.time_remaining()
    if left is not None and left <= 0:
        log.info("%s not started: its deadline passed while it waited for a worker", method)
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before the server could "
                                                         "start it (busy); nothing was done")


# The controller pings its agents every 5 s to notice a powered-off node within seconds (agents.py); the
# server must accept those pings, or it answers a ping flood with GOAWAY and drops the connection.
KEEPALIVE_OPTIONS = [("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.min_recv_ping_interval_without_data_ms", 4_000),
                     ("grpc.http2.max_ping_strikes", 0)]


# Calls a server runs at once. The controller's and the agent's take as many as their clients make (the
# provisioner runs 100 workers, the attacher 10 more), so that a quick call (a publish, a grant) never waits in the
# queue behind a hundred CreateVolume calls; what must take turns does so where it must (LVM's changes:
# csi/storage/lvm.py CHANGES_AT_ONCE). The node plugin keeps a small pool: its stages run mkfs and logins.
CONTROLLER_WORKERS = 128
AGENT_WORKERS = 128
NODE_WORKERS = 16


def make_server(max_workers: int = NODE_WORKERS, authorize: Callable[[str, object, object], None] | None = None,
                metrics=None) -> grpc.Server:
    """`metrics`: a csi/metrics.py RpcMetrics that counts and times every call of every servicer added."""
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                       interceptors=[CallInterceptor(authorize, metrics)],
                       options=[("grpc.so_reuseport", 0)] + KEEPALIVE_OPTIONS)


def serve(server: grpc.Server, endpoint: str, credentials: grpc.ServerCredentials | None = None) -> None:
    remove_stale_socket(endpoint)
    address = listen_address(endpoint)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {endpoint}")
    if address.startswith("unix:"):
        os.chmod(address[len("unix:"):], 0o660)
    server.start()
    log.info("serving on %s%s", endpoint, " (mutual TLS)" if credentials else "")


# ---------------------------------------------------------------------------------------------- locks

class KeyLocks:
    """One lock per ID. A second call on an ID that is busy gets ABORTED at once, as the CSI spec asks,
    instead of queueing behind the first (the sidecars retry with backoff). An ID can also be reserved with a
    reason (the agent's volumes while its start restores them): a call on it gets ABORTED with that reason until
    the holder releases it."""

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._reserved: dict[str, str] = {}
        self._mutex = threading.Lock()

    @contextlib.contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        keys = tuple(sorted({k for k in keys if k}))
        with self._mutex:
            taken = [k for k in keys if k in self._busy]
            if taken:
                why = self._reserved.get(taken[0])
                raise errors.aborted(f"{taken[0]} is {why}: retry" if why else
                                     f"an operation on {taken[0]} is already in progress")
            self._busy.update(keys)
        try:
            yield
        finally:
            with self._mutex:
                self._busy.difference_update(keys)

    def reserve(self, keys, why: str) -> None:
        """Holds these IDs until release(): none may be busy (called before anything else can take them)."""
        keys = {k for k in keys if k}
        with self._mutex:
            taken = sorted(keys & self._busy)
            if taken:
                raise RuntimeError(f"cannot reserve {taken[0]}: it is busy")
            self._busy.update(keys)
            self._reserved.update(dict.fromkeys(keys, why))

    def release(self, key: str) -> None:
        with self._mutex:
            if self._reserved.pop(key, None) is not None:
                self._busy.discard(key)

    def reserved(self, key: str) -> bool:
        with self._mutex:
            return key in self._reserved

    def reserved_count(self) -> int:
        with self._mutex:
            return len(self._reserved)


def wait_forever(server: grpc.Server, on_stop: Callable[[], None] | None = None) -> None:
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    server.stop(grace=5).wait()
    if on_stop:
        on_stop()
