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


@dataclass(frozen=True)
class TlsFiles:
    """ca.crt, tls.crt, tls.key in one directory: the layout of a Kubernetes TLS secret plus its CA."""
    directory: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return tuple((self.directory / n).read_bytes() for n in ("ca.crt", "tls.crt", "tls.key"))  # type: ignore
        except OSError as exc:
            raise ValueError(f"TLS directory {self.directory}: {exc}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        ca, cert, key = self.read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
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
    deadline, and maps every exception to a status through errors.status_of."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_stream is not None:
            return self._stream(handler, method)
        if handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def call(request, context):
            started = time.monotonic()
            _refuse_expired(method, context)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s request: %s", method, _safe_redact(request))
            try:
                with deadline(context.time_remaining()):
                    response = inner(request, context)
            except Exception as exc:  # noqa: BLE001 - this is the one place that maps every error
                code, message = errors.status_of(exc)
                message = short(message)
                level = logging.ERROR if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) else logging.INFO
                log.log(level, "%s failed after %.3fs: %s %s", method, time.monotonic() - started, code.name, message,
                        exc_info=level == logging.ERROR and not isinstance(exc, errors.CsiError))
                context.abort(code, message)
            log.info("%s ok in %.3fs", method, time.monotonic() - started)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s response: %s", method, _safe_redact(response))
            return response

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


    @staticmethod
    def _stream(handler, method: str):
        inner = handler.unary_stream

        def call(request, context):
            started = time.monotonic()
            _refuse_expired(method, context)
            try:
                with deadline(context.time_remaining()):
                    yield from inner(request, context)
            except Exception as exc:  # noqa: BLE001 - as for unary calls
                code, message = errors.status_of(exc)
                message = short(message)
                log.log(logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO,
                        "%s stream failed after %.3fs: %s %s", method, time.monotonic() - started, code.name,
                        message)
                context.abort(code, message)
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


def make_server(max_workers: int = 16) -> grpc.Server:
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=[CallInterceptor()],
                       options=[("grpc.so_reuseport", 0)])


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
    instead of queueing behind the first (the sidecars retry with backoff)."""

    def __init__(self) -> None:
        self._busy: set[str] = set()
        self._mutex = threading.Lock()

    @contextlib.contextmanager
    def hold(self, *keys: str) -> Iterator[None]:
        keys = tuple(sorted({k for k in keys if k}))
        with self._mutex:
            taken = [k for k in keys if k in self._busy]
            if taken:
                raise errors.aborted(f"an operation on {taken[0]} is already in progress")
            self._busy.update(keys)
        try:
            yield
        finally:
            with self._mutex:
                self._busy.difference_update(keys)


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
