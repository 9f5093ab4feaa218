"""The node's md RAID1 of replicated volumes (csi/node/raid.py) and which legs a stage trusts
(csi/node/replicated.py). mdadm's answers are its real output, recorded on a UML node
(recorded/record_mdadm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi import contract, errors, ids
from csi.node import raid
from csi.node.replicated import Replicated
from tests.unit.conftest import recorded

KEY = "e2e-replicated-0123456789"


def mdadm_answers(case_of: dict[str, str]):
    """mdadm --examine [--export] <device>: the recorded case named for that device."""
    def answer(argv):
        case = case_of[argv[-1]]
        name = f"mdadm_examine_export_{case}" if "--export" in argv else f"mdadm_examine_{case}"
        if case == "none":
            name = "mdadm_examine_export_none"
        return int(recorded(name + ".rc")), recorded(name + ".stdout"), ""
    return answer


@pytest.mark.parametrize("case, state, events", [("both", "AA", 0), ("alone", "A.", 4), ("left_behind", "AA", 0)])
def test_examine_reads_the_array_state_each_leg_knows(fake_run, case, state, events):
    export = "both"   # --export has no array state: the same recorded lines serve every case
    fake_run.on("mdadm", "--examine", "--export", fn=lambda argv: (0, recorded(f"mdadm_examine_export_{export}.stdout")
                                                                 .replace("MD_EVENTS=0", f"MD_EVENTS={events}"), ""))
    fake_run.on("mdadm", "--examine", "/dev/sdb", rc=0, stdout=recorded(f"mdadm_examine_{case}.stdout"))
    sb = raid.examine(Path("/dev/sdb"))
    uuid = [line.split("=", 1)[1] for line in recorded("mdadm_examine_export_both.stdout").splitlines()
            if line.startswith("MD_UUID=")][0]
    assert sb == raid.Superblock(uuid, "lvmiscsi:0123456789abcdef", events, state)


def test_a_leg_without_a_superblock_has_none(fake_run):
    fake_run.on("mdadm", "--examine", "--export", rc=int(recorded("mdadm_examine_export_none.rc")),
                stdout=recorded("mdadm_examine_export_none.stdout"),
                stderr="mdadm: No md superblock detected on /dev/sdb.\n")
    assert raid.examine(Path("/dev/sdb")) is None
    assert fake_run.calls == [["mdadm", "--examine", "--export", "/dev/sdb"]]


def test_a_leg_mdadm_cannot_read_is_not_taken_for_a_blank_one(fake_run):
    # mdadm exits 1 for an unreadable device too: that leg must never be taken for a new one and overwritten.
    fake_run.on("mdadm", "--examine", "--export", rc=1, stderr="mdadm: cannot open /dev/sdb: No such device\n")
    with pytest.raises(errors.CsiError) as e:
        raid.examine(Path("/dev/sdb"))
    assert e.value.code == errors.Code.UNAVAILABLE


def test_create_makes_a_failfast_raid1_with_a_bitmap_and_its_data_1_mib_in(fake_run):
    fake_run.on("mdadm", "--create")
    raid.create(KEY, [Path("/dev/sdb"), Path("/dev/sdc")])
    name = ids.md_name(KEY)
    assert len(name) <= 32 and name.startswith("lvmiscsi:")
    assert fake_run.calls == [["mdadm", "--create", f"/dev/md/csi-{name.split(':')[1]}", "--run", "--level=1",
                               "--raid-devices=2", "--metadata=1.2", "--data-offset=1M", "--bitmap=internal",
                               f"--name={name}", "--assume-clean", "--failfast", "/dev/sdb", "/dev/sdc"]]
    # the controller makes each leg that much larger than the volume
    from csi.controller.replicas import MD_RESERVE
    assert MD_RESERVE == 1 << 20


def test_mdadm_makes_the_arrays_dev_md_link_itself(fake_run):
    """In the node plugin's container the host's udev cannot read mdadm's map, and would name the link otherwise:
    every mdadm call makes (and --stop removes) /dev/md/<name> itself."""
    fake_run.on("mdadm")
    raid.create(KEY, [Path("/dev/sdb"), Path("/dev/sdc")])
    raid.assemble(KEY, [Path("/dev/sdb")])
    raid.add(KEY, Path("/dev/sdc"))
    assert len(fake_run.envs) == 3 and all(env.get("MDADM_NO_UDEV") == "1" for env in fake_run.envs)


def test_a_read_only_stage_assembles_read_only(fake_run):
    fake_run.on("mdadm", "--assemble")
    raid.assemble(KEY, [Path("/dev/sdb")], read_only=True)
    assert fake_run.calls == [["mdadm", "--assemble", str(raid.md_device(KEY)), "--run", "--readonly", "/dev/sdb"]]


def test_readd_falls_back_to_a_full_recovery(fake_run):
    fake_run.on("mdadm", "--manage")
    fake_run.on("mdadm", "--manage", str(raid.md_device(KEY)), "--re-add", rc=1, stderr="mdadm: --re-add for "
                "/dev/sdc to /dev/md/x is not possible")
    raid.readd(KEY, Path("/dev/sdc"))
    md = str(raid.md_device(KEY))
    assert fake_run.calls[-2:] == [["mdadm", "--manage", md, "--re-add", "/dev/sdc"],
                                   ["mdadm", "--manage", md, "--failfast", "--add", "/dev/sdc"]]


def test_a_leg_recorded_outdated_is_cleared_and_recovered_in_full(fake_run):
    # Its event count may be the higher one (an operator outdated the leg holding the last writes): a re-add
    # could let md take it as current; cleared, it can only be a new member, copied from the array.
    fake_run.on("mdadm")
    raid.readd(KEY, Path("/dev/sdc"), outdated=True)
    md = str(raid.md_device(KEY))
    assert fake_run.calls[-2:] == [["mdadm", "--zero-superblock", "/dev/sdc"],
                                   ["mdadm", "--manage", md, "--failfast", "--add", "/dev/sdc"]]
    assert ["mdadm", "--manage", md, "--re-add", "/dev/sdc"] not in fake_run.calls


def test_the_udev_rule_keeps_incremental_assembly_off_our_arrays_only(tmp_path, fake_run):
    fake_run.on("udevadm")
    path = raid.install_udev_rule(tmp_path)
    text = path.read_text()
    # Debian's 64-md-raid-assembly.rules leaves a device alone when SYSTEMD_READY is 0; the rule must sort before it.
    assert path.name < "64-md-raid-assembly.rules"
    assert 'ENV{ID_FS_LABEL}=="lvmiscsi:*"' in text and 'ENV{SYSTEMD_READY}="0"' in text
    assert fake_run.calls == [["udevadm", "control", "--reload"]]
    raid.install_udev_rule(tmp_path)      # unchanged: not written or reloaded again
    assert len(fake_run.calls) == 1


def test_status_reads_md_sysfs(tmp_path, monkeypatch):
    dev = tmp_path / "dev-md"
    dev.mkdir()
    link = dev / "csi-x"
    (tmp_path / "md127").write_text("")
    link.symlink_to(tmp_path / "md127")
    monkeypatch.setattr(raid, "md_device", lambda key: link)
    md = tmp_path / "sys" / "md127" / "md"
    for name, state in (("dev-sdb", "in_sync,failfast"), ("dev-sdc", "faulty,failfast")):
        (md / name).mkdir(parents=True)
        (md / name / "state").write_text(state + "\n")
    (md / "degraded").write_text("1\n")
    (md / "sync_action").write_text("recover\n")
    (md / "sync_completed").write_text("2048 / 8192\n")
    (md / "array_state").write_text("clean\n")
    no_map = tmp_path / "no-map"
    array = raid.status(KEY, sysfs=tmp_path / "sys", map_file=no_map)
    assert [(m.device, m.in_sync) for m in array.members] == [("/dev/sdb", True), ("/dev/sdc", False)]
    assert array.degraded == 1 and array.progress() == 0.25
    # md's map names the array of each md device mdadm started: this one, or another array's
    mdmap = tmp_path / "map"
    mdmap.write_text(f"md126 1.2 aaaaaaaa:bbbbbbbb:cccccccc:dddddddd /dev/md/csi-y\n"
                     f"md127 1.2 01234567:89abcdef:01234567:89abcdef {link}\n")
    assert raid.status(KEY, sysfs=tmp_path / "sys", map_file=mdmap) == array
    mdmap.write_text("md127 1.2 01234567:89abcdef:01234567:89abcdef /dev/md/csi-another-volume\n")
    assert raid.status(KEY, sysfs=tmp_path / "sys", map_file=mdmap) is None, "a link left to a reused md number"
    (md / "array_state").write_text("clear\n")      # the md device is there, its array stopped
    assert raid.status(KEY, sysfs=tmp_path / "sys", map_file=no_map) is None


def test_stop_removes_the_arrays_link(tmp_path, monkeypatch, fake_run):
    """mdadm leaves the /dev/md link to udev at --stop, and a host without md's udev rules keeps it: a link left
    would point at whatever array gets that md number next."""
    fake_run.on("mdadm", "--stop")
    link = tmp_path / "csi-x"
    link.symlink_to(tmp_path / "md127")
    monkeypatch.setattr(raid, "md_device", lambda key: link)
    running = [raid.Array(tmp_path / "md127", (), 0, "idle", "none")]
    monkeypatch.setattr(raid, "status", lambda key: running[0])
    raid.stop(KEY)
    assert fake_run.calls == [["mdadm", "--stop", str(link)]] and not link.is_symlink()
    link.symlink_to(tmp_path / "md127")                 # a link left by another stop: no array behind it
    running[0] = None
    raid.stop(KEY)
    assert len(fake_run.calls) == 1 and not link.is_symlink()


# ------------------------------------------------------------------------ which legs a stage trusts

def _legs(outdated=(False, False), seed=None) -> list[contract.Leg]:
    return [contract.Leg(i, f"storage-{i + 1}", "csi-vg", KEY, outdated[i],
                         contract.Attachment(f"iqn.2026-11.dev.csi.lvm-iscsi:csi-vg.{i}", ("10.0.0.1:3260",), 0,
                                             f"storage-{i + 1}", "10.0.0.1:7001"), seed == i)
            for i in range(2)]


def _sb(state: str) -> raid.Superblock:
    return raid.Superblock("u", ids.md_name(KEY), 1, state)


def test_both_legs_here_are_assembled_together_md_picks_the_newest():
    assert Replicated._current(KEY, _legs(), {0: _sb("AA"), 1: _sb("A.")}, set(), []) == [0, 1]


def test_a_lone_leg_that_went_on_alone_is_current():
    assert Replicated._current(KEY, _legs(), {0: _sb("A.")}, set(), ["leg 1 away"]) == [0]


def test_a_lone_leg_whose_peer_is_recorded_outdated_or_blank_is_current():
    assert Replicated._current(KEY, _legs((False, True)), {0: _sb("AA")}, set(), ["x"]) == [0]
    assert Replicated._current(KEY, _legs(), {0: _sb("AA")}, {1}, []) == [0]   # a new leg, blank: holds nothing


def test_a_lone_leg_that_cannot_be_proven_current_is_refused():
    # Its superblock shows both in sync: the absent leg may have gone on alone since (the worker that wrote to it
    # alone died, then this leg's peer went down). Serving this leg could serve old data.
    with pytest.raises(errors.CsiError) as e:
        Replicated._current(KEY, _legs(), {1: _sb("AA")}, set(), ["leg 0 on storage-1: down"])
    assert e.value.code == errors.Code.UNAVAILABLE and "storage-1" in e.value.message


def test_a_leg_recorded_outdated_is_never_assembled_from():
    with pytest.raises(errors.CsiError) as e:
        Replicated._current(KEY, _legs((True, False)), {0: _sb("A.")}, set(), ["leg 1 away"])
    assert e.value.code == errors.Code.FAILED_PRECONDITION
    assert Replicated._current(KEY, _legs((True, False)), {0: _sb("A."), 1: _sb("AA")}, set(), []) == [1]


def test_a_leg_of_another_array_is_refused():
    with pytest.raises(errors.CsiError) as e:
        raid.refuse_foreign(KEY, Path("/dev/sdb"), raid.Superblock("u", "lvmiscsi:ffffffffffffffff", 1, "AA"))
    assert e.value.code == errors.Code.FAILED_PRECONDITION


class _Assembly:
    """Replicated._assemble with its legs already logged in (here: index -> device), superblocks and blkid
    answers given per device, and every md change recorded instead of made."""

    def __init__(self, monkeypatch, here, sbs, blank):
        from csi.node import mount, replicated
        self.made = []
        monkeypatch.setattr(raid, "status", lambda key: None)
        monkeypatch.setattr(raid, "examine", lambda dev: sbs.get(str(dev)))
        monkeypatch.setattr(mount, "probe", lambda dev: mount.Signatures() if str(dev) in blank
                            else mount.Signatures("ext4", "filesystem"))
        for name in ("create", "create_from_seed", "add", "assemble", "readd", "grow"):
            monkeypatch.setattr(raid, name, lambda *a, _n=name, **kw: self.made.append((_n, a, kw)))
        self.rep = replicated.Replicated(service=None)
        monkeypatch.setattr(self.rep, "_login_all", lambda legs: ({i: Path(d) for i, d in here.items()},
                                                                  [f"leg {i} away" for i in (0, 1) if i not in here]))


def test_a_leg_without_a_superblock_that_holds_data_is_never_written(monkeypatch):
    a = _Assembly(monkeypatch, {0: "/dev/sdb", 1: "/dev/sdc"}, {"/dev/sdb": _sb("A.")}, blank=set())
    with pytest.raises(errors.CsiError) as e:
        a.rep._assemble(KEY, _legs(), read_only=False)
    assert e.value.code == errors.Code.FAILED_PRECONDITION and "/dev/sdc" in e.value.message
    assert a.made == []


def test_a_blank_leg_is_added_for_a_full_recovery_and_a_new_volume_gets_a_new_array(monkeypatch):
    a = _Assembly(monkeypatch, {0: "/dev/sdb", 1: "/dev/sdc"}, {"/dev/sdb": _sb("AA")}, blank={"/dev/sdc"})
    a.rep._assemble(KEY, _legs(), read_only=False)
    assert [(n, args[1]) for n, args, _ in a.made[:2]] == [("assemble", [Path("/dev/sdb")]),
                                                           ("readd", Path("/dev/sdc"))]
    assert a.made[1][2] == {"outdated": False}
    b = _Assembly(monkeypatch, {0: "/dev/sdb", 1: "/dev/sdc"}, {}, blank={"/dev/sdb", "/dev/sdc"})
    b.rep._assemble(KEY, _legs(), read_only=False)
    assert [n for n, _, _ in b.made] == ["create"]


def test_a_read_only_stage_never_creates_re_adds_or_grows(monkeypatch):
    a = _Assembly(monkeypatch, {0: "/dev/sdb", 1: "/dev/sdc"}, {"/dev/sdb": _sb("A."), "/dev/sdc": _sb("AA")},
                  blank=set())
    a.rep._assemble(KEY, _legs(), read_only=True)
    assert [(n, kw) for n, _, kw in a.made] == [("assemble", {})] and a.made[0][1][2] is True
    b = _Assembly(monkeypatch, {0: "/dev/sdb", 1: "/dev/sdc"}, {}, blank={"/dev/sdb", "/dev/sdc"})
    with pytest.raises(errors.CsiError) as e:
        b.rep._assemble(KEY, _legs(), read_only=True)
    assert e.value.code == errors.Code.FAILED_PRECONDITION and b.made == []


def test_a_leg_outdated_by_the_record_is_assembled_without_and_put_back_in_full(monkeypatch):
    # leg 0 was outdated by an operator while it held the newest writes (its superblock shows leg 1 missing)
    a = _Assembly(monkeypatch, {0: "/dev/sdb", 1: "/dev/sdc"}, {"/dev/sdb": _sb("A."), "/dev/sdc": _sb("AA")},
                  blank=set())
    a.rep._assemble(KEY, _legs(outdated=(True, False)), read_only=False)
    assert [(n, args[1], kw) for n, args, kw in a.made[:2]] == [
        ("assemble", [Path("/dev/sdc")], {}), ("readd", Path("/dev/sdb"), {"outdated": True})]


# ------------------------------------------------------------------------ a volume made from a replicated source

SOURCE_SB = raid.Superblock("u0", "lvmiscsi:ffffffffffffffff", 9, "AA")    # the source array's, on the seed


def test_create_from_seed_makes_the_array_on_the_seed_alone(fake_run):
    fake_run.on("mdadm", "--create")
    raid.create_from_seed(KEY, Path("/dev/sdb"))
    name = ids.md_name(KEY)
    assert fake_run.calls == [["mdadm", "--create", f"/dev/md/csi-{name.split(':')[1]}", "--run", "--level=1",
                               "--raid-devices=2", "--metadata=1.2", "--data-offset=1M", "--bitmap=internal",
                               f"--name={name}", "--failfast", "/dev/sdb", "missing"]]


def test_the_first_stage_of_a_restore_makes_its_array_from_the_seed_and_copies_it_to_the_new_leg(monkeypatch):
    a = _Assembly(monkeypatch, {0: "/dev/sdb", 1: "/dev/sdc"}, {"/dev/sdb": SOURCE_SB}, blank={"/dev/sdc"})
    a.rep._assemble(KEY, _legs(seed=0), read_only=False)
    assert [(n, args) for n, args, _ in a.made] == [("create_from_seed", (KEY, Path("/dev/sdb"))),
                                                    ("add", (KEY, Path("/dev/sdc")))]


def test_once_the_array_exists_the_seed_is_an_ordinary_leg(monkeypatch):
    a = _Assembly(monkeypatch, {0: "/dev/sdb", 1: "/dev/sdc"}, {"/dev/sdb": _sb("A.")}, blank={"/dev/sdc"})
    a.rep._assemble(KEY, _legs(seed=0), read_only=False)
    assert [n for n, _, _ in a.made[:2]] == ["assemble", "readd"]


@pytest.mark.parametrize("here, sbs, blank, outdated, read_only, code", [
    ({1: "/dev/sdc"}, {}, {"/dev/sdc"}, (False, False), False, errors.Code.UNAVAILABLE),      # the seed away
    ({0: "/dev/sdb", 1: "/dev/sdc"}, {"/dev/sdb": SOURCE_SB}, {"/dev/sdc"}, (True, False), False,
     errors.Code.UNAVAILABLE),                                                              # the seed outdated
    ({0: "/dev/sdb", 1: "/dev/sdc"}, {"/dev/sdb": SOURCE_SB}, set(), (False, False), False,
     errors.Code.FAILED_PRECONDITION),                                                      # the new leg holds data
    ({0: "/dev/sdb", 1: "/dev/sdc"}, {"/dev/sdb": SOURCE_SB, "/dev/sdc": SOURCE_SB}, {"/dev/sdc"}, (False, False),
     False, errors.Code.FAILED_PRECONDITION),                                               # ... or an md array
    ({0: "/dev/sdb", 1: "/dev/sdc"}, {"/dev/sdb": SOURCE_SB}, {"/dev/sdc"}, (False, False), True,
     errors.Code.FAILED_PRECONDITION),                                                      # read-only first stage
])
def test_a_restore_whose_seed_cannot_be_used_is_refused_and_nothing_is_written(monkeypatch, here, sbs, blank,
                                                                               outdated, read_only, code):
    a = _Assembly(monkeypatch, here, sbs, blank)
    with pytest.raises(errors.CsiError) as e:
        a.rep._assemble(KEY, _legs(outdated, seed=0), read_only=read_only)
    assert e.value.code == code, e.value.message
    assert a.made == []


def test_a_lone_leg_being_rebuilt_is_never_current():
    rebuilding = raid.Superblock("u", ids.md_name(KEY), 1, "A.", recovering=True)
    with pytest.raises(errors.CsiError) as e:
        Replicated._current(KEY, _legs(), {1: rebuilding}, set(), ["leg 0 away"])
    assert e.value.code == errors.Code.UNAVAILABLE


def test_examine_sees_a_leg_being_rebuilt(fake_run):
    human = recorded("mdadm_examine_both.stdout").replace("    Data Offset :",
                                                          "Recovery Offset : 2048 sectors\n    Data Offset :")
    assert "Recovery Offset" in human
    fake_run.on("mdadm", "--examine", "--export", rc=0, stdout=recorded("mdadm_examine_export_both.stdout"))
    fake_run.on("mdadm", "--examine", "/dev/sdb", rc=0, stdout=human)
    assert raid.examine(Path("/dev/sdb")).recovering
