"""Making a block backstore (csi/storage/lio.py _make_store): a device busy when it is enabled is tried again,
then ABORTED for the provisioner to retry, never INTERNAL; other failures are not retried. A new store takes an
index that neither this agent's map nor configfs holds, and is in the map at once, with no read of configfs."""

from __future__ import annotations

import errno

import pytest

from csi import errors
from csi.storage import lio


class Rts:
    def __init__(self, failures):
        self.failures, self.made = list(failures), []

    def BlockStorageObject(self, name, dev, wwn, index):   # noqa: N802 - rtslib's name
        if self.failures:
            raise self.failures.pop(0)
        self.made.append((name, dev, wwn))
        self.index = index
        return name


def busy():
    return OSError(errno.EBUSY, "Device or resource busy")


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    monkeypatch.setattr(lio.time, "sleep", lambda s: None)


@pytest.fixture(autouse=True)
def store_map(tmp_path, monkeypatch) -> dict:
    """rtslib's map of backstore names to indexes (already read), and a configfs of our own."""
    from rtslib_fb import tcm
    monkeypatch.setattr(tcm, "bs_cache", {"iblock/old": 0, "fileio/f": 1})
    monkeypatch.setattr(lio, "CONFIGFS", tmp_path / "target")
    (tmp_path / "target" / "core").mkdir(parents=True)
    return tcm.bs_cache


def test_a_new_store_takes_an_index_free_in_the_map_and_in_configfs_and_is_mapped_at_once(store_map):
    (lio.CONFIGFS / "core" / "iblock_2").mkdir()        # another cluster's agent made one meanwhile
    rts = Rts([])
    lio._make_store(rts, "lv1", "/dev/vg/lv1", "w")
    assert rts.index == 3 and store_map["iblock/lv1"] == 3
    assert lio._free_store_index() == 4


def test_an_unread_map_is_read_before_a_new_store_enters_it(monkeypatch):
    from rtslib_fb import tcm
    monkeypatch.setattr(tcm, "bs_cache", {})
    looked_up = []

    def lookup(name):   # what rtslib does at a lookup while its map is empty: reads every store from configfs
        looked_up.append(name)
        tcm.bs_cache.update({"iblock/made-before": 0})
    monkeypatch.setattr(lio, "_find_store", lookup)
    assert lio._free_store_index() == 1 and len(looked_up) == 1


def test_a_busy_device_is_tried_again():
    rts = Rts([busy(), busy()])
    assert lio._make_store(rts, "lv1", "/dev/vg/lv1", "w") == "lv1"
    assert rts.made == [("lv1", "/dev/vg/lv1", "w")]


def test_a_device_busy_every_time_gets_aborted_with_the_reason():
    rts = Rts([busy()] * lio.STORE_BUSY_TRIES)
    with pytest.raises(errors.CsiError) as e:
        lio._make_store(rts, "lv1", "/dev/vg/lv1", "w")
    assert e.value.code == errors.Code.ABORTED and "/dev/vg/lv1 is busy" in e.value.message
    assert e.value.message.endswith("retry") and rts.made == []


def test_other_failures_are_not_retried():
    rts = Rts([OSError(errno.ENOENT, "No such file or directory"), busy()])
    with pytest.raises(OSError) as e:
        lio._make_store(rts, "lv1", "/dev/vg/lv1", "w")
    assert e.value.errno == errno.ENOENT and len(rts.failures) == 1


def test_a_store_made_with_its_own_index_is_what_rtslib_finds_by_name(store_map, monkeypatch):
    """The map's key for a store made with an explicit index is rtslib's own: its lookup by name finds it."""
    from rtslib_fb import node
    monkeypatch.setattr(node.CFSNode, "configfs_dir", str(lio.CONFIGFS))
    rts = Rts([])
    lio._make_store(rts, "lv1", "/dev/vg/lv1", "w")
    (lio.CONFIGFS / "core" / f"iblock_{rts.index}" / "lv1").mkdir(parents=True)   # what the kernel holds then
    found = lio._find_store("lv1")
    assert found is not None and found.path == str(lio.CONFIGFS / "core" / f"iblock_{rts.index}" / "lv1")
    assert lio._find_store("lv2") is None


def test_a_store_removed_behind_the_agents_back_is_forgotten_without_touching_its_old_index(store_map):
    """targetcli removed our store at index 0 and another cluster's agent made its own there since: rtslib,
    asked about ours, would try to remove that HBA directory. The entry is dropped and nothing is asked."""
    store_map["iblock/ours"] = 5
    theirs = lio.CONFIGFS / "core" / "iblock_5" / "theirs"
    theirs.mkdir(parents=True)
    assert lio._find_store("ours") is None
    assert "iblock/ours" not in store_map and theirs.is_dir()
