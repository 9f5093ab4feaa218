"""LVM argv and report parsing, against output recorded from a real LVM (UML, see recorded/)."""

import json

import pytest

from csi.runner import CommandError
from csi.storage.lvm import Lvm, already_exists, is_missing, lvm_config, parse_thin_pool_status
from tests.unit.conftest import Overlap, recorded, recorded_failure

LVS_ONE = json.dumps({"report": [{"lv": [{
    "lv_name": "c1-pvc-1-abc", "vg_name": "csi-vg", "lv_size": "1073741824",
    "lv_tags": "dev.csi.lvm-iscsi/cluster=c1,dev.csi.lvm-iscsi/kind=volume", "pool_lv": "thinpool",
    "lv_attr": "Vwi-a-tz--", "data_percent": "0.00", "metadata_percent": "", "origin": "", "lv_time": "x"}]}]})


@pytest.fixture
def lvm(tmp_path):
    return Lvm(tmp_path / "sys")


def test_lv_parses_json_report_and_uses_own_config_dir(fake_run, lvm, tmp_path):
    fake_run.on("lvs", stdout=LVS_ONE)
    lv = lvm.lv("csi-vg", "c1-pvc-1-abc")
    assert fake_run.calls[0] == ["lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
                                 "lv_name,vg_name,lv_size,lv_tags,pool_lv,lv_attr,data_percent,metadata_percent,"
                                 "origin,lv_time", "csi-vg/c1-pvc-1-abc"]
    assert fake_run.envs[0]["LVM_SYSTEM_DIR"] == str(tmp_path / "sys")
    assert fake_run.envs[0]["LC_ALL"] == "C"
    assert (lv.size, lv.pool, lv.active, lv.tag("dev.csi.lvm-iscsi/cluster")) == (1 << 30, "thinpool", True, "c1")
    assert lv.path == "/dev/csi-vg/c1-pvc-1-abc"


@pytest.mark.parametrize("name", ["lvs_missing", "lvs_novg"])
def test_missing_lv_or_vg_is_none(fake_run, lvm, name):
    rc, out, err = recorded_failure(name)
    fake_run.on("lvs", rc=rc, stderr=err)
    assert lvm.lv("csi-vg", "missing") is None


def test_other_lvs_failures_raise(fake_run, lvm):
    fake_run.on("lvs", rc=5, stderr="  Some other problem\n")
    with pytest.raises(Exception, match="Some other problem"):
        lvm.lv("csi-vg", "x")


def test_vg_from_recorded_report(fake_run, lvm):
    fake_run.on("vgs", stdout=recorded("vgs.json"))
    vg = lvm.vg("csi-vg")
    assert (vg.name, vg.size, vg.free, vg.extent_size, vg.lv_count) == ("csi-vg", 2143289344, 2143289344, 4 << 20, 0)
    rc, _, err = recorded_failure("vgs_missing")
    fake_run.on("vgs", rc=rc, stderr=err)
    assert lvm.vg("nosuchvg") is None


def test_remove_of_missing_lv_succeeds(fake_run, lvm):
    rc, _, err = recorded_failure("lvremove_missing")
    fake_run.on("lvremove", rc=rc, stderr=err)
    lvm.remove("csi-vg", "missing")
    assert fake_run.calls == [["lvremove", "--yes", "csi-vg/missing"]]


def test_a_taken_name_is_recognised_from_lvcreates_own_words(fake_run, lvm):
    # The agent's CreateVolume lets lvcreate be the atomic "does it exist?" check (see service._may_exist).
    rc, _, err = recorded_failure("lvcreate_exists")
    fake_run.on("lvcreate", rc=rc, stderr=err)
    with pytest.raises(CommandError) as taken:
        lvm.create("csi-vg", "vol1", 1 << 30, [], "thinpool")
    assert already_exists(taken.value)
    fake_run.on("lvcreate", rc=5, stderr='  Volume group "csi-vg" has insufficient free space (1 extents).\n')
    with pytest.raises(CommandError) as full:
        lvm.create("csi-vg", "vol1", 1 << 30, [])
    assert not already_exists(full.value)


def test_thin_pool_fill_from_the_kernels_recorded_status(fake_run, lvm):
    # Recorded with 2 thin volumes in a 2.39 GiB pool (64 KiB chunks), one of them written with 24 MiB; `lvs`
    # said then: Data% 0.98, Meta% 11.43.
    fake_run.on("dmsetup", "status", stdout=recorded("dmsetup_status_thinpool.txt"))
    fill = lvm.thin_pool_fill("csi-vg", "thinpool")
    assert fake_run.calls == [["dmsetup", "status", "csi--vg-thinpool-tpool"]]
    assert fill.size == 5021696 * 512
    assert (round(fill.data_percent, 2), round(fill.metadata_percent, 2)) == (0.98, 11.43)
    rc, _, err = recorded_failure("dmsetup_status_missing")
    fake_run.on("dmsetup", "status", rc=rc, stderr=err)
    assert lvm.thin_pool_fill("csi-vg", "thinpool") is None
    assert parse_thin_pool_status("0 4194304 thin-pool Fail\n") is None


def test_a_snapshot_of_a_missing_origin_is_recognised(fake_run, lvm):
    rc, _, err = recorded_failure("lvcreate_snapshot_missing")
    fake_run.on("lvcreate", rc=rc, stderr=err)
    with pytest.raises(CommandError) as missing:
        lvm.snapshot("csi-vg", "missing", "snap1", [], activate=False)
    assert is_missing(missing.value) and not already_exists(missing.value)


def test_create_thin_and_thick_argv(fake_run, lvm):
    fake_run.on("lvcreate")
    lvm.create("vg", "lv1", 1 << 30, ["t=1", "u=2"], thin_pool="tp")
    lvm.create("vg", "lv2", 8 << 20, ["t=1"])
    assert fake_run.calls == [
        ["lvcreate", "--yes", "--name", "lv1", "--activate", "y", "--setactivationskip", "n", "--addtag", "t=1",
         "--addtag", "u=2", "--virtualsize", "1073741824b", "--thin", "vg/tp"],
        ["lvcreate", "--yes", "--name", "lv2", "--activate", "y", "--setactivationskip", "n", "--addtag", "t=1",
         "--size", "8388608b", "--wipesignatures", "y", "--zero", "y", "vg"]]


def test_config_accepts_only_configured_devices_and_never_scans_lvs(tmp_path):
    text = lvm_config(["/dev/loop*", "/dev/sdb"], tmp_path)
    assert 'global_filter = [ "a|^/dev/loop.*$|", "a|^/dev/sdb$|", "r|.*|" ]' in text
    assert "scan_lvs = 0" in text and "auto_activation_volume_list = [ ]" in text
    # In a pod there is no udev to wait on (thin pool activation failed without these in the k8s e2e run).
    for line in ("udev_sync = 0", "udev_rules = 0", "obtain_device_list_from_udev = 0"):
        assert line in text, line
    assert f'backup_dir = "{tmp_path}/lvm/backup"' in text
    with pytest.raises(ValueError):
        lvm_config(['/dev/x|"'], tmp_path)


def test_lvm_changes_take_turns_and_reports_do_not_wait_for_them(fake_run, tmp_path):
    """The agent serves many calls at once (csi/server.py AGENT_WORKERS); its LVM changes run at most
    `changes_at_once` at a time, and a report or a change whose caller's deadline passes in the wait is never
    started (nothing to finish for a caller that has gone)."""
    import threading
    import time

    from csi import errors, runner
    lvm = Lvm(tmp_path / "sys", changes_at_once=2)
    go = threading.Event()
    lvcreate = Overlap(gate=go)
    fake_run.on("lvcreate", fn=lvcreate)
    fake_run.on("lvs", stdout=LVS_ONE)
    makers = [threading.Thread(target=lvm.create, args=("csi-vg", f"v{i}", 1 << 30, [], "thinpool"))
              for i in range(6)]
    for t in makers:
        t.start()
    deadline = time.monotonic() + 10
    while lvcreate.running < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lvcreate.running == 2
    assert lvm.lv("csi-vg", "c1-pvc-1-abc") is not None      # a report while both turns are taken
    with runner.deadline(0.2), pytest.raises(errors.CsiError) as late:
        lvm.create("csi-vg", "late", 1 << 30, [], "thinpool")
    assert late.value.code == errors.Code.DEADLINE_EXCEEDED and "nothing was done" in late.value.message
    assert not any("csi-vg/late" in " ".join(c) or "late" in c for c in fake_run.calls)
    go.set()
    for t in makers:
        t.join(10)
    assert lvcreate.most == 2 and sum(c[0] == "lvcreate" for c in fake_run.calls) == 6
