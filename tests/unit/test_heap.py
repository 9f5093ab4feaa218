"""csi/heap.py: with its thresholds, a TLS gRPC stream of 1 MiB messages no longer pages in fresh memory for
nearly every page it moves. Measured on real gRPC and glibc, in processes of their own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.unit.heap_probe import MIB

ROOT = Path(__file__).resolve().parents[2]
PER_MIB = 20     # seen: 3-9 minor faults per MiB streamed with the thresholds, 53-490 without


def faults(pki: Path, mode: str) -> int:
    done = subprocess.run([sys.executable, "-m", "tests.unit.heap_probe", str(pki), mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_a_tls_stream_pages_in_no_fresh_memory_per_message_with_the_thresholds(tmp_path):
    default, kept = faults(tmp_path, "default"), faults(tmp_path, "keep")
    assert default > PER_MIB * MIB, f"{default} faults without the thresholds: the probe shows nothing to keep"
    assert kept < PER_MIB * MIB, f"{kept} minor faults for {MIB} MiB with the thresholds (without: {default})"
