"""Regenerates the Python modules of csi.proto and agent.proto.

`scripts/gen-proto` writes them next to the .proto files; the drift test in tests/unit/test_proto.py writes
them to a temporary directory and compares. Needs grpcio-tools (the `test` extra), not needed at run time.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("csi.proto", "agent.proto")
PACKAGE = "csi.proto"  # where the generated modules live once installed

# protoc writes `import csi_pb2 as csi__pb2`, which only works with csi/proto on sys.path.
_BARE_IMPORT = re.compile(
    r"^import (?P<module>%s) as (?P<alias>\w+)$"
    % "|".join(re.escape(Path(p).stem + "_pb2") for p in PROTOS),
    re.MULTILINE,
)


def protoc(*args: str) -> None:
    """Runs grpc_tools' bundled protoc, which also puts the well-known google/protobuf/*.proto on the path."""
    cmd = [sys.executable, "-m", "grpc_tools.protoc", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr}")


def generate(out_dir: Path) -> list[Path]:
    """Writes <name>_pb2.py, <name>_pb2.pyi and <name>_pb2_grpc.py for each proto into out_dir.

    Returns the files written, sorted. The output does not depend on out_dir: imports always name the
    installed package, so the files are byte-identical wherever they are generated.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    protoc(
        f"--proto_path={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_DIR / p) for p in PROTOS),
    )
    written = []
    for proto in PROTOS:
        stem = Path(proto).stem
        for name in (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py"):
            path = out_dir / name
            path.write_text(_package_imports(path.read_text()))
            written.append(path)
    return sorted(written)


def _package_imports(source: str) -> str:
    return _BARE_IMPORT.sub(rf"from {PACKAGE} import \g<module> as \g<alias>", source)


def main() -> None:
    for path in generate(PROTO_DIR):
        print(path.relative_to(PROTO_DIR.parent.parent))


if __name__ == "__main__":
    main()
