"""The last tagged release (deploy/releases.txt), for the upgrade the Kubernetes tier tests: its tree taken from
git (chart, code, lock), and its driver image built from that tree as the working tree's is (images.py)."""

from __future__ import annotations

import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.e2e.k8s import images

RELEASES = images.PROJECT / "deploy/releases.txt"
CHART = Path("deploy/helm/lvm-iscsi-csi")
# What the upgrade needs from a release's tree: its chart, and what its image is built from.
TREE = ["pyproject.toml", "requirements.lock", "csi", str(CHART)]
SEMVER = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?")


@dataclass(frozen=True)
class Release:
    tag: str        # vX.Y.Z
    commit: str     # 40 hex digits

    @property
    def version(self) -> str:
        return self.tag.removeprefix("v")


def releases(path: Path = RELEASES) -> list[Release]:
    """Every release listed, oldest first; a malformed line is an error, not skipped."""
    found = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not SEMVER.fullmatch(parts[0].removeprefix("v")) or not parts[0].startswith("v") \
                or not re.fullmatch(r"[0-9a-f]{40}", parts[1]):
            raise ValueError(f"{path}:{number}: want 'vX.Y.Z <40-hex commit>', got {line!r}")
        found.append(Release(parts[0], parts[1]))
    return found


def last_release() -> Release:
    listed = releases()
    if not listed:
        raise ValueError(f"{RELEASES} lists no release")
    return listed[-1]


def semver_key(version: str) -> tuple:
    """Sort key of a semantic version: X.Y.Z, then a release above any of its pre-releases (0.2.0-dev < 0.2.0)."""
    match = SEMVER.fullmatch(version)
    if not match:
        raise ValueError(f"not a semantic version: {version!r}")
    core = tuple(int(x) for x in match.group(1, 2, 3))
    return core + ((1,) if match.group(4) is None else (0, match.group(4)))


def git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(images.PROJECT), *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise images.ImageError(f"git {' '.join(args)} failed with {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def has_commit(commit: str) -> bool:
    return subprocess.run(["git", "-C", str(images.PROJECT), "cat-file", "-e", f"{commit}^{{commit}}"],
                          capture_output=True, timeout=60).returncode == 0


def chart_at(commit: str) -> dict:
    return yaml.safe_load(git("show", f"{commit}:{CHART}/Chart.yaml"))


def checkout(release: Release) -> Path:
    """The release's tree (TREE) under <cache>/releases/<tag>-<commit>, from `git archive`; kept between runs."""
    if not has_commit(release.commit):
        raise images.ImageError(
            f"commit {release.commit} of release {release.tag} is not in this clone (a shallow one?): "
            f"`git fetch --unshallow` or clone with the whole history")
    dest = images.CACHE / "releases" / f"{release.tag}-{release.commit[:12]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Under the lock images.py takes per archive: the background image build and the fixture may both get here.
    with images.building(dest):
        if not dest.exists():
            with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
                archive, tree = Path(tmp) / "tree.tar", Path(tmp) / "tree"
                git("archive", "--format=tar", "-o", str(archive), release.commit, "--", *TREE)
                with tarfile.open(archive) as tar:
                    tar.extractall(tree, filter="data")
                tree.rename(dest)      # whole or not at all
    return dest


def release_image(log=print) -> images.Image:
    """The last release's driver image, e2e.local/lvm-iscsi-csi:<tag>."""
    release = last_release()
    return images.driver_image(checkout(release), tag=release.tag, log=log)


def release_chart() -> Path:
    return checkout(last_release()) / CHART
