"""Our CSI proto and the modules generated from it.

csi/proto/csi.proto is written in this repo with our own comments, so nothing but a test keeps it equal to
the official spec. These tests:

- fetch the official csi.proto v1.13.0 with `go mod download` (cached under $CSI_CACHE, so only the first run
  needs the network), compile both files to descriptors with grpc_tools' protoc and compare them element by
  element: everything that reaches the wire or the generated API (names, numbers, types, labels, oneofs,
  json names, options such as csi_secret and the alpha markers, services and methods). Comments and source
  positions are not part of a compiled descriptor set and are ignored;
- prove the comparison can fail, by mutating single elements of the official descriptors;
- regenerate the Python modules into a temporary directory and require the committed ones to be identical;
- import the committed modules and look for the services they must define.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, empty_pb2, unknown_fields

from csi.proto import generate

SPEC_MODULE = "github.com/container-storage-interface/spec"
SPEC_VERSION = "v1.13.0"
SPEC_SUM = "h1:6ja3nYoACisewTPAAZkJ1pbf4+1ehhvt9Z/nYgWGHGw="  # go.sum hash of the module zip
OUR_PROTO = generate.PROTO_DIR / "csi.proto"

FDP = descriptor_pb2.FieldDescriptorProto


# ---- getting the two descriptor sets ------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("CSI_CACHE", "/var/cache/lvm-iscsi-csi"))


def _find_go() -> str | None:
    found = shutil.which("go")
    if found is None and Path("/usr/local/go/bin/go").exists():  # the official tarball, often not on PATH
        found = "/usr/local/go/bin/go"
    return found


class _Unavailable(Exception):
    """The official proto could not be fetched; the message says what to install or fix."""


def _download_official_proto() -> Path:
    """Returns the official csi.proto from the Go module cache, downloading the module on first use."""
    go = _find_go()
    if go is None:
        raise _Unavailable(
            "`go` is not installed: the official csi.proto is fetched with `go mod download`. Install Go "
            "(https://go.dev/dl/, /usr/local/go/bin on PATH) as scripts/setup expects, then rerun."
        )
    cache = _cache_dir()
    env = dict(
        os.environ,
        GOPATH=str(cache / "go"),
        GOMODCACHE=str(cache / "go" / "pkg" / "mod"),
        GOCACHE=str(cache / "go-build"),
        GOFLAGS="-mod=mod",
        GOTOOLCHAIN="local",
    )
    argv = [go, "mod", "download", "-json", f"{SPEC_MODULE}@{SPEC_VERSION}"]
    try:
        with tempfile.TemporaryDirectory() as cwd:  # outside any go.mod
            result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise _Unavailable(f"`{' '.join(argv)}` timed out; is the Go module proxy reachable?") from None
    try:
        info = json.loads(result.stdout)
    except json.JSONDecodeError:
        info = {}
    if result.returncode != 0 or info.get("Error") or not info.get("Dir"):
        raise _Unavailable(
            f"`go mod download {SPEC_MODULE}@{SPEC_VERSION}` failed (exit {result.returncode}); it needs Go "
            f"and access to the Go module proxy (see scripts/setup).\n"
            f"error: {info.get('Error', '')}\nstderr: {result.stderr.strip()}"
        )
    if info.get("Sum") != SPEC_SUM:
        raise _Unavailable(f"{SPEC_MODULE}@{SPEC_VERSION} has hash {info.get('Sum')!r}, expected {SPEC_SUM}")
    return Path(info["Dir"]) / "csi.proto"


def _compile(proto: Path) -> descriptor_pb2.FileDescriptorSet:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        generate.protoc(
            f"--proto_path={proto.parent}", f"--descriptor_set_out={out}", "--include_imports", str(proto)
        )
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@functools.cache
def _official_set_bytes() -> bytes | _Unavailable:
    """Cached even when it fails, so a missing proxy costs one attempt, not one per test."""
    try:
        return _compile(_download_official_proto()).SerializeToString()
    except _Unavailable as e:
        return e


def official_file() -> descriptor_pb2.FileDescriptorProto:
    """A fresh copy (tests may mutate it) of the official descriptor. Fails the test without Go."""
    result = _official_set_bytes()
    if isinstance(result, _Unavailable):
        pytest.fail(str(result), pytrace=False)
    return _file_named(descriptor_pb2.FileDescriptorSet.FromString(result), "csi.proto")


@functools.cache
def _our_set_bytes() -> bytes:
    return _compile(OUR_PROTO).SerializeToString()


def our_file() -> descriptor_pb2.FileDescriptorProto:
    return _file_named(descriptor_pb2.FileDescriptorSet.FromString(_our_set_bytes()), "csi.proto")


def _file_named(fds: descriptor_pb2.FileDescriptorSet, name: str) -> descriptor_pb2.FileDescriptorProto:
    (found,) = [f for f in fds.file if f.name == name]
    return found


# ---- flattening a file descriptor into comparable elements --------------------------------------------
#
# Every element (file, message, field, oneof, enum, value, service, method, extension) becomes one entry
# "kind full.name" -> {attribute: value}. Two files are equal when their entries are; a difference is
# reported as the entry and attribute that differ. Order of declaration is not compared: it does not reach
# the wire (oneof membership is compared by name, not by index).

Elements = dict[str, dict[str, object]]


def describe(file: descriptor_pb2.FileDescriptorProto) -> Elements:
    # Custom options are extensions declared in the file itself: name them, e.g. (csi_secret).
    ext_names = {(e.extendee, e.number): f"({e.name})" for e in file.extension}
    opts = functools.partial(_options, ext_names=ext_names)
    scope = f".{file.package}" if file.package else ""
    out: Elements = {
        "file": {
            "name": file.name,
            "package": file.package,
            "syntax": file.syntax,
            "edition": file.edition,
            "dependencies": sorted(file.dependency),
            "public dependencies": sorted(file.public_dependency),
            "options": opts(file.options),
        }
    }
    for message in file.message_type:
        _describe_message(out, scope, message, opts)
    for enum in file.enum_type:
        _describe_enum(out, scope, enum, opts)
    for ext in file.extension:
        out[f"extension {scope}.{ext.name}"] = _field_attributes(ext, None, opts)
    for service in file.service:
        name = f"{scope}.{service.name}"
        out[f"service {name}"] = {"options": opts(service.options)}
        for method in service.method:
            out[f"method {name}.{method.name}"] = {
                "input_type": method.input_type,
                "output_type": method.output_type,
                "client_streaming": method.client_streaming,
                "server_streaming": method.server_streaming,
                "options": opts(method.options),
            }
    return out


def _describe_message(out: Elements, scope: str, message: descriptor_pb2.DescriptorProto, opts) -> None:
    name = f"{scope}.{message.name}"
    out[f"message {name}"] = {
        "options": opts(message.options),
        "reserved ranges": sorted((r.start, r.end) for r in message.reserved_range),
        "reserved names": sorted(message.reserved_name),
        "extension ranges": sorted((r.start, r.end) for r in message.extension_range),
    }
    for oneof in message.oneof_decl:
        out[f"oneof {name}.{oneof.name}"] = {"options": opts(oneof.options)}
    for field in message.field:
        oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
        out[f"field {name}.{field.name}"] = _field_attributes(field, oneof, opts)
    for ext in message.extension:
        out[f"extension {name}.{ext.name}"] = _field_attributes(ext, None, opts)
    for nested in message.nested_type:
        _describe_message(out, name, nested, opts)
    for enum in message.enum_type:
        _describe_enum(out, name, enum, opts)


def _describe_enum(out: Elements, scope: str, enum: descriptor_pb2.EnumDescriptorProto, opts) -> None:
    name = f"{scope}.{enum.name}"
    out[f"enum {name}"] = {
        "options": opts(enum.options),
        "reserved ranges": sorted((r.start, r.end) for r in enum.reserved_range),
        "reserved names": sorted(enum.reserved_name),
    }
    for value in enum.value:
        out[f"enum value {name}.{value.name}"] = {"number": value.number, "options": opts(value.options)}


def _field_attributes(field: FDP, oneof: str | None, opts) -> dict[str, object]:
    return {
        "number": field.number,
        "label": FDP.Label.Name(field.label),
        "type": FDP.Type.Name(field.type),
        "type_name": field.type_name,
        "extendee": field.extendee,
        "oneof": oneof,
        "proto3_optional": field.proto3_optional,
        "json_name": field.json_name,
        "default_value": field.default_value,
        "options": opts(field.options),
    }


def _options(options, ext_names: dict[tuple[str, int], str]) -> list[tuple[str, object]]:
    """Options as sorted (name, value) pairs, from the wire bytes.

    Parsed into Empty so every option, standard or custom, is an unknown field, whatever extensions the
    running process happens to have registered.
    """
    extendee = f".{options.DESCRIPTOR.full_name}"
    standard = options.DESCRIPTOR.fields_by_number
    raw = empty_pb2.Empty.FromString(options.SerializeToString())
    pairs = []
    for f in unknown_fields.UnknownFieldSet(raw):
        if f.field_number in standard:
            name = standard[f.field_number].name
        else:
            name = ext_names.get((extendee, f.field_number), f"({f.field_number})")
        data = f.data
        if isinstance(data, bytes):
            data = data.decode("utf-8", "backslashreplace")
        elif isinstance(data, unknown_fields.UnknownFieldSet):  # a group: not used by any option we know
            data = repr(data)
        pairs.append((name, data))
    return sorted(pairs, key=repr)


def differences(
    official: descriptor_pb2.FileDescriptorProto, ours: descriptor_pb2.FileDescriptorProto
) -> list[str]:
    """One line per element that is missing, extra or different in ours, naming the element."""
    want, got = describe(official), describe(ours)
    lines = []
    for key in sorted(want.keys() | got.keys()):
        if key not in got:
            lines.append(f"{key}: missing in ours")
        elif key not in want:
            lines.append(f"{key}: not in the official spec")
        else:
            for attr, value in want[key].items():
                if got[key][attr] != value:
                    lines.append(f"{key}: {attr} is {got[key][attr]!r}, official {value!r}")
    return lines


# ---- our csi.proto against the official one ------------------------------------------------------------


def test_csi_proto_matches_official_spec():
    diff = differences(official_file(), our_file())
    assert not diff, (
        f"csi/proto/csi.proto differs from the official {SPEC_VERSION} csi.proto:\n  " + "\n  ".join(diff)
    )


def test_comparison_covers_every_element_kind():
    kinds = {key.rsplit(" ", 1)[0] for key in describe(official_file())}
    assert kinds == {
        "file", "message", "field", "oneof", "enum", "enum value", "service", "method", "extension",
    }


def _message(file, path: str) -> descriptor_pb2.DescriptorProto:
    """A message by its dotted path inside the file, e.g. "VolumeCapability.AccessMode"."""
    first, *rest = path.split(".")
    (message,) = [m for m in file.message_type if m.name == first]
    for part in rest:
        (message,) = [m for m in message.nested_type if m.name == part]
    return message


def _field(file, path: str) -> FDP:
    message_path, name = path.rsplit(".", 1)
    (field,) = [f for f in _message(file, message_path).field if f.name == name]
    return field


def _method(file, path: str):
    service_name, name = path.split(".")
    (service,) = [s for s in file.service if s.name == service_name]
    (method,) = [m for m in service.method if m.name == name]
    return method


def _drop_csi_secret(file):
    options = _field(file, "CreateVolumeRequest.secrets").options
    options.Clear()  # the only option on that field


def _drop_alpha_service(file):
    (service,) = [s for s in file.service if s.name == "SnapshotMetadata"]
    service.options.Clear()


def _renumber_enum_value(file):
    mode = _message(file, "VolumeCapability.AccessMode").enum_type[0]
    (value,) = [v for v in mode.value if v.name == "MULTI_NODE_MULTI_WRITER"]
    value.number = 8


def _move_out_of_oneof(file):
    _field(file, "VolumeContentSource.volume").ClearField("oneof_index")


MUTATIONS: dict[str, tuple[Callable, str]] = {
    "field number": (
        lambda f: setattr(_field(f, "CreateVolumeRequest.secrets"), "number", 9),
        "field .csi.v1.CreateVolumeRequest.secrets: number is 9, official 5",
    ),
    "nested field type": (
        lambda f: setattr(_field(f, "VolumeCapability.MountVolume.fs_type"), "type", FDP.TYPE_BYTES),
        "field .csi.v1.VolumeCapability.MountVolume.fs_type: type is 'TYPE_BYTES', official 'TYPE_STRING'",
    ),
    "csi_secret option": (
        _drop_csi_secret,
        "field .csi.v1.CreateVolumeRequest.secrets: options is [], official [('(csi_secret)', 1)]",
    ),
    "alpha_service option": (
        _drop_alpha_service,
        "service .csi.v1.SnapshotMetadata: options is [], official [('(alpha_service)', 1)]",
    ),
    "enum value": (
        _renumber_enum_value,
        "enum value .csi.v1.VolumeCapability.AccessMode.Mode.MULTI_NODE_MULTI_WRITER: "
        "number is 8, official 5",
    ),
    "oneof membership": (
        _move_out_of_oneof,
        "field .csi.v1.VolumeContentSource.volume: oneof is None, official 'type'",
    ),
    "streaming flag": (
        lambda f: setattr(_method(f, "SnapshotMetadata.GetMetadataDelta"), "server_streaming", False),
        "method .csi.v1.SnapshotMetadata.GetMetadataDelta: server_streaming is False, official True",
    ),
    "extension number": (
        lambda f: setattr([e for e in f.extension if e.name == "csi_secret"][0], "number", 1061),
        "extension .csi.v1.csi_secret: number is 1061, official 1059",
    ),
    "removed message": (
        lambda f: f.message_type.remove(_message(f, "VolumeHealth")),
        "message .csi.v1.VolumeHealth: missing in ours",
    ),
    "reserved field number": (
        lambda f: _message(f, "NodeGetVolumeStatsResponse").ClearField("reserved_range"),
        "message .csi.v1.NodeGetVolumeStatsResponse: reserved ranges is [], official [(2, 3)]",
    ),
    "package": (
        lambda f: setattr(f, "package", "csi.v2"),
        "file: package is 'csi.v2', official 'csi.v1'",
    ),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_comparison_reports_a_mutated_element(mutation):
    mutate, expected = MUTATIONS[mutation]
    mutated = official_file()
    mutate(mutated)
    assert expected in differences(official_file(), mutated)


# ---- the generated modules ----------------------------------------------------------------------------


def test_generated_modules_are_up_to_date(tmp_path):
    fresh = generate.generate(tmp_path)
    stale = [
        p.name for p in fresh
        if not (generate.PROTO_DIR / p.name).exists()
        or (generate.PROTO_DIR / p.name).read_bytes() != p.read_bytes()
    ]
    assert not stale, (
        f"generated modules differ from csi/proto/*.proto: {', '.join(stale)}. "
        "Run scripts/gen-proto and commit the result (the output also depends on the grpcio-tools version)."
    )


def test_generated_modules_import_and_define_the_services():
    from csi.proto import agent_pb2, agent_pb2_grpc, csi_pb2, csi_pb2_grpc

    assert set(csi_pb2.DESCRIPTOR.services_by_name) == {
        "Identity", "Controller", "GroupController", "SnapshotMetadata", "Node",
    }
    assert set(agent_pb2.DESCRIPTOR.services_by_name) == {"Agent"}
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    # The gRPC modules import their message modules through the package, so both must share one descriptor.
    assert csi_pb2_grpc.csi__pb2 is csi_pb2
    assert agent_pb2_grpc.agent__pb2 is agent_pb2
    for service in ("Identity", "Controller", "GroupController", "Node"):
        assert hasattr(csi_pb2_grpc, f"{service}Servicer")
        assert hasattr(csi_pb2_grpc, f"add_{service}Servicer_to_server")
    secrets = csi_pb2.CreateVolumeRequest.DESCRIPTOR.fields_by_name["secrets"]
    assert secrets.GetOptions().Extensions[csi_pb2.csi_secret] is True
