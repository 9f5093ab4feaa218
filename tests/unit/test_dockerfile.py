"""The driver's image, checked statically (no container engine runs here): Dockerfile, .dockerignore, and the
one list of Debian packages (deploy/packages.txt) that the Dockerfile and the e2e image builder both read.
checkov scans the Dockerfile offline (--skip-download); it must report nothing."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
PACKAGES = ROOT / "deploy" / "packages.txt"
CACHE = Path(os.environ.get("CSI_CACHE", "/var/cache/lvm-iscsi-csi"))
# What the driver runs: LVM (+ thin pools), iscsiadm, mkfs/resize for both file systems, mount/blkid/blockdev.
REQUIRED_PACKAGES = {"lvm2", "thin-provisioning-tools", "open-iscsi", "e2fsprogs", "xfsprogs", "util-linux"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        assert result, f"{ins[0]} before the first FROM"
        result[-1].append(ins)
    return result


def packages() -> list[str]:
    return [line.split("#", 1)[0].strip() for line in PACKAGES.read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def test_multi_stage_build_on_one_base_pinned_by_tag():
    froms = [args.split() for word, args in instructions() if word == "FROM"]
    assert len(froms) >= 2, "expected a build stage and a runtime stage"
    stage_names = {f[2] for f in froms if len(f) == 3 and f[1].upper() == "AS"}
    images = {f[0] for f in froms if f[0] not in stage_names}
    assert len(images) == 1, f"every stage should use the same base: {images}"
    image = images.pop()
    name, _, tag = image.partition("@")[0].rpartition(":")
    assert name and tag and tag != "latest" and "$" not in image, image
    assert re.match(r"^\d+\.\d+\.\d+-", tag), f"{image}: pin the base by a full version tag"
    assert re.search(r"slim-trixie$", tag), (
        f"{image}: Debian 13 (trixie), the stable release with security support (bookworm's ended in June 2026)")
    # The runtime interpreter must satisfy the package's requires-python.
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    minimum = tuple(int(x) for x in re.match(r">=\s*(\d+)\.(\d+)", requires).groups())
    assert tuple(int(x) for x in tag.split(".")[:2]) >= minimum


def test_debian_packages_come_only_from_packages_txt():
    listed = packages()
    assert REQUIRED_PACKAGES <= set(listed), f"deploy/packages.txt lacks {REQUIRED_PACKAGES - set(listed)}"
    assert len(listed) == len(set(listed))
    runs = [(i, args) for i, st in enumerate(stages()) for word, args in st if word == "RUN"]
    installs = [(i, args) for i, args in runs if "apt-get install" in args or "apt install" in args]
    assert len(installs) == 1, f"one apt-get install, fed from deploy/packages.txt: {installs}"
    stage, args = installs[0]
    assert stage == len(stages()) - 1, "Debian packages belong in the runtime stage"
    assert re.search(r"/tmp/packages\.txt\s*\|\s*xargs apt-get install -y --no-install-recommends\s*(&&|$)", args), args
    shells = [a for w, a in stages()[stage] if w == "SHELL"]
    assert shells and "pipefail" in json.loads(shells[0]), "the piped install needs pipefail"
    copies = [a for w, a in stages()[stage] if w == "COPY"]
    assert "deploy/packages.txt /tmp/packages.txt" in copies
    # No package named on the command line besides the list.
    after = args.split("xargs apt-get install", 1)[1].split("&&", 1)[0]
    assert shlex.split(after) == ["-y", "--no-install-recommends"], after
    assert "rm -rf /var/lib/apt/lists/*" in args
    # The image must not carry an initiator name: each node uses its host's.
    assert "rm -f /etc/iscsi/initiatorname.iscsi" in args


def test_the_package_is_built_into_a_venv_and_copied_into_the_runtime():
    build, runtime = stages()[0], stages()[-1]
    assert build[0][1].split()[-2:][0].upper() == "AS", "the build stage is named"
    build_name = build[0][1].split()[-1]
    build_runs = " ".join(a for w, a in build if w == "RUN")
    assert "python -m venv /opt/lvm-iscsi-csi" in build_runs
    # Dependencies only as requirements.lock pins them, hash-checked, from wheels (the slim base has no compiler);
    # then the package itself, offline, with the locked build backend.
    installs = re.findall(r"/opt/lvm-iscsi-csi/bin/pip install ([^&]*)", build_runs)
    assert [shlex.split(i) for i in installs] == [
        ["--require-hashes", "--only-binary=:all:", "-r", "requirements.lock"],
        ["--no-deps", "--no-build-isolation", "--no-index", "."]], installs
    assert "/opt/lvm-iscsi-csi/bin/pip check" in build_runs
    copied = [a for w, a in build if w == "COPY"]
    assert "requirements.lock pyproject.toml ./" in copied and "csi ./csi" in copied
    assert f"--from={build_name} /opt/lvm-iscsi-csi /opt/lvm-iscsi-csi" in [a for w, a in runtime if w == "COPY"]
    env = " ".join(a for w, a in runtime if w == "ENV")
    assert "PATH=/opt/lvm-iscsi-csi/bin:$PATH" in env


def test_entrypoint_is_the_console_script_run_unprivileged_by_default():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    runtime = stages()[-1]
    entry = [a for w, a in runtime if w == "ENTRYPOINT"]
    assert len(entry) == 1 and json.loads(entry[0]) == ["lvm-iscsi-csi"] and "lvm-iscsi-csi" in scripts
    users = [a for w, a in runtime if w == "USER"]
    assert users and re.match(r"^[1-9]\d{3,}(:[1-9]\d{3,})?$", users[-1]), users
    assert [a for w, a in runtime if w == "HEALTHCHECK"] == ["NONE"]


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """Docker's rules: patterns in order, `!` re-includes, the last match wins, a match on a parent directory
    counts for everything under it; `**` matches any number of directories, `*` one path element's characters."""
    out = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        out.append((negate, re.compile(f"^{regex}$")))
    return out


def in_build_context(path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    included = True
    for negate, regex in _dockerignore_patterns():
        if any(regex.match(c) for c in candidates):
            included = negate
    return included


def test_build_context_holds_what_the_build_needs_and_nothing_else():
    needed = ["pyproject.toml", "requirements.lock", "csi/cli.py", "csi/proto/csi.proto", "csi/proto/agent.proto",
              "deploy/packages.txt", "csi/lab/guest-init.sh"]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert in_build_context(path), f"{path} is needed by the build but .dockerignore excludes it"
    for path in (".venv/bin/python", ".git/HEAD", "tests/unit/test_chart.py", "deploy/helm/lvm-iscsi-csi/values.yaml",
                 "deploy/manifests/lvm-iscsi-csi.yaml", "csi/__pycache__/cli.cpython-311.pyc", "Dockerfile",
                 "bench/x", "lvm_iscsi_csi.egg-info/PKG-INFO"):
        assert not in_build_context(path), f"{path} should stay out of the build context"
    # Every COPY source exists and is in the context.
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert (ROOT / src).exists() and in_build_context(src), src


def locked() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: normalized name -> (version, sha256 hashes)."""
    out: dict[str, tuple[str, list[str]]] = {}
    entry = None
    for raw in (ROOT / "requirements.lock").read_text().splitlines():
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line:
            continue
        if line.startswith("--hash="):
            assert entry, raw
            algo, _, digest = line.removeprefix("--hash=").partition(":")
            assert algo == "sha256" and re.fullmatch(r"[0-9a-f]{64}", digest), raw
            out[entry][1].append(digest)
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)", line)
        assert m, f"requirements.lock: {raw!r} is not a pinned requirement (name==version)"
        entry = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        assert entry not in out, f"{entry} pinned twice"
        out[entry] = (m.group(2), [])
    return out


def test_requirements_lock_pins_every_dependency_with_hashes():
    """The image's Python packages are those of requirements.lock (scripts/lock-requirements), each pinned and
    hash-checked: every dependency of pyproject.toml and of its build backend is there, at a version its range
    accepts, with at least one sha256; no index, link or editable lines."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    lock = locked()
    assert lock and all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]
    text = (ROOT / "requirements.lock").read_text()
    for banned in ("--index-url", "--extra-index-url", "--find-links", "-e ", "--trusted-host"):
        assert banned not in text, banned
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [Requirement(r) for r in project["project"]["dependencies"] + project["build-system"]["requires"]]
    for req in wanted:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in lock, f"{req.name} (pyproject.toml) is not in requirements.lock: run scripts/lock-requirements"
        assert req.specifier.contains(Version(lock[name][0]), prereleases=True), (
            f"requirements.lock pins {req.name}=={lock[name][0]}, outside pyproject.toml's {req.specifier}: "
            "run scripts/lock-requirements")


def test_checkov_finds_nothing_in_the_dockerfile(tmp_path):
    candidates = [os.environ.get("CHECKOV", ""), str(Path(sys.executable).parent / "checkov"),
                  str(CACHE / "checkov" / "bin" / "checkov")]
    checkov = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if checkov is None:
        pytest.fail(f"checkov not found ({', '.join(c for c in candidates if c)}): run scripts/setup", pytrace=False)
    (tmp_path / "Dockerfile").write_text(DOCKERFILE.read_text())
    r = subprocess.run([checkov, "-d", str(tmp_path), "--framework", "dockerfile", "--skip-download", "--compact",
                        "--quiet", "--output", "json"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    assert r.returncode in (0, 1), r.stderr[-3000:]
    report = json.loads(r.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["check_type"] == "dockerfile" and report["summary"]["passed"] > 0, r.stdout[:2000]
    failed = [(c["check_id"], c["check_name"]) for c in report["results"]["failed_checks"]]
    assert not failed, failed
