"""deploy/releases.txt: every listed release is in the history with the chart version its tag says, its tag (when
the clone has it) names the same commit, and the working tree's versions are above the last release."""

from __future__ import annotations

import subprocess
import tomllib

import pytest
import yaml

import csi
from tests.e2e.k8s import release

CHART = release.images.PROJECT / release.CHART


def test_releases_file_parses_oldest_first():
    listed = release.releases()
    assert listed, "deploy/releases.txt lists no release"
    keys = [release.semver_key(r.version) for r in listed]
    assert keys == sorted(keys) and len(set(keys)) == len(keys), [r.tag for r in listed]


@pytest.mark.parametrize("line", ["0.1.0 " + "a" * 40, "v0.1 " + "a" * 40, "v0.1.0 abc", "v0.1.0"])
def test_a_malformed_release_line_is_an_error(tmp_path, line):
    path = tmp_path / "releases.txt"
    path.write_text(f"# comment\n{line}\n")
    with pytest.raises(ValueError, match=r"releases.txt:2"):
        release.releases(path)


def test_semver_order_puts_a_prerelease_below_its_release():
    assert release.semver_key("0.1.0") < release.semver_key("0.2.0-dev") < release.semver_key("0.2.0") \
        < release.semver_key("0.10.0")
    with pytest.raises(ValueError):
        release.semver_key("0.2")


@pytest.mark.parametrize("listed", release.releases(), ids=lambda r: r.tag)
def test_each_release_commit_carries_its_version(listed):
    assert release.has_commit(listed.commit), f"{listed.commit} ({listed.tag}) is not in this clone's history"
    chart = release.chart_at(listed.commit)
    assert (chart["version"], chart["appVersion"]) == (listed.version, listed.version)
    tagged = subprocess.run(["git", "-C", str(release.images.PROJECT), "rev-parse", "--verify", "--quiet",
                             f"refs/tags/{listed.tag}^{{commit}}"], capture_output=True, text=True)
    if tagged.returncode == 0:    # a clone without tags still has the commits
        assert tagged.stdout.strip() == listed.commit


def test_working_tree_is_above_the_last_release_and_agrees_with_itself():
    chart = yaml.safe_load(CHART.joinpath("Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == csi.__version__
    assert release.semver_key(chart["version"]) > release.semver_key(release.last_release().version)
    project = tomllib.loads((release.images.PROJECT / "pyproject.toml").read_text())["project"]["version"]
    # PEP 440 spells the chart's X.Y.Z-dev as X.Y.Z.dev0
    assert project == chart["version"].replace("-dev", ".dev0"), (project, chart["version"])
