"""iscsiadm argv, exit-code meanings and session parsing (recorded from open-iscsi in UML)."""

import pytest

from csi import errors
from csi.node.iscsi import Iscsiadm, Target, parse_sessions, read_initiator_name
from tests.unit.conftest import Overlap, recorded_failure

T = Target("iqn.2026-11.dev.csi.lvm-iscsi:vg.lv", ("10.0.0.1:3260",), 0, "u1", "secret-123456789", "t1",
           "mutual-secret-9876")
SESSION_OUT = "tcp: [3] 10.0.0.1:3260,1 iqn.2026-11.dev.csi.lvm-iscsi:vg.lv (non-flash)\n"


def test_no_sessions_is_empty(fake_run):
    rc, _, err = recorded_failure("session_none")
    fake_run.on("iscsiadm", "-m", "session", rc=rc, stderr=err)
    assert Iscsiadm().sessions() == []


def test_parse_sessions():
    (s,) = parse_sessions(SESSION_OUT)
    assert (s.sid, s.portal, s.iqn) == (3, "10.0.0.1:3260", T.iqn)


def test_login_sets_manual_startup_and_chap_with_no_secret_in_any_argv(fake_run, caplog, node_db):
    caplog.set_level("DEBUG")
    fake_run.on("iscsiadm", "-m", "node")
    Iscsiadm().login(T)
    base = ["iscsiadm", "-m", "node", "-T", T.iqn, "-p", "10.0.0.1:3260"]
    # two processes: the record is made, then written once with every setting, then the login
    assert fake_run.calls == [base + ["-o", "new"], base + ["--login"]]
    record = node_db / T.iqn / "10.0.0.1,3260,1" / "default"   # open-iscsi's own naming
    lines = record.read_text().splitlines()
    settings = dict(line.split(" = ", 1) for line in lines if " = " in line)
    assert settings["node.startup"] == "manual"     # replaced, not doubled: the fake record said automatic
    assert [line for line in lines if line.startswith("node.startup")] == ["node.startup = manual"]
    assert settings["node.conn[0].timeo.login_timeout"] == "10"
    assert settings["node.session.initial_login_retry_max"] == "2"
    assert settings["node.name"] == T.iqn         # what iscsiadm wrote is kept
    # the CHAP settings are in the record file itself, private, and nowhere in a command line or a log
    assert [line for line in lines if line.startswith("node.session.auth.")] == [
        "node.session.auth.authmethod = CHAP", "node.session.auth.username = u1",
        "node.session.auth.password = secret-123456789", "node.session.auth.username_in = t1",
        "node.session.auth.password_in = mutual-secret-9876"]
    assert lines[0].startswith("# BEGIN RECORD") and lines[-1] == "# END RECORD"
    assert record.stat().st_mode & 0o777 == 0o600
    assert not [c for c in fake_run.calls if any("secret" in a for a in c)]
    assert "secret-123456789" not in caplog.text and "mutual-secret-9876" not in caplog.text


def test_login_skipped_when_session_exists(fake_run, iscsi_sysfs):
    iscsi_sysfs.add(3, T.iqn, "10.0.0.1")
    fake_run.on("iscsiadm", "-m", "node")
    Iscsiadm().login(T)
    assert not any("--login" in c for c in fake_run.calls)


def test_sessions_are_read_from_sysfs_by_target_and_portal(iscsi_sysfs):
    iscsi_sysfs.add(1, T.iqn, "10.0.0.1")
    iscsi_sysfs.add(2, T.iqn, "fd00:0::7", 3261)              # printed as Portal prints it
    iscsi_sysfs.add(4, "iqn.2026-11.dev.csi.lvm-iscsi:vg.other", "10.0.0.2")
    (iscsi_sysfs.sessions / "session9").mkdir()               # going away meanwhile: no targetname
    assert Iscsiadm().logged_in_portals(T.iqn) == {"10.0.0.1:3260", "[fd00::7]:3261"}
    assert Iscsiadm().logged_in_portals("iqn.2026-11.dev.csi.lvm-iscsi:vg.none") == set()


def test_the_disk_is_found_in_sysfs_by_target_portal_and_lun(iscsi_sysfs):
    leg_a = Target(T.iqn, ("10.0.0.1:3260",), 1)
    leg_b = Target(T.iqn, ("10.0.0.2:3260",), 1)     # replica legs on two storage nodes share one IQN
    iscsi_sysfs.add(1, T.iqn, "10.0.0.1")
    iscsi_sysfs.add(2, T.iqn, "10.0.0.2")
    iscsi_sysfs.add_disk(1, 10, "sdb")                # LUN 10 is not LUN 1
    sdc = iscsi_sysfs.add_disk(1, 1, "sdc")
    sdd = iscsi_sysfs.add_disk(2, 1, "sdd")
    assert Iscsiadm.session_disk(leg_a) == sdc and Iscsiadm.find_device(leg_a) == sdc
    assert Iscsiadm.session_disk(leg_b) == sdd
    assert Iscsiadm.find_device(Target(T.iqn, ("10.0.0.3:3260",), 1)) is None     # no session there
    assert Iscsiadm.find_device(Target(T.iqn, ("10.0.0.1:3260",), 2)) is None     # no such LUN


def test_a_disk_whose_dev_node_is_not_made_or_does_not_open_yet_is_not_found(iscsi_sysfs):
    """The kernel shows the disk in sysfs and makes its node before the disk opens (ENXIO until then): blkid
    on it then would say "nothing found" of a disk full of data."""
    import socket
    iscsi_sysfs.add(1, T.iqn, "10.0.0.1")
    iscsi_sysfs.add_disk(1, 0, "sdb", node=False)     # registered in sysfs, devtmpfs not done yet
    assert Iscsiadm.find_device(T) is None
    node = iscsi_sysfs.dev / "sdb"
    with socket.socket(socket.AF_UNIX) as not_openable:   # open(2) of a socket file fails with ENXIO
        not_openable.bind(str(node))
        assert Iscsiadm.find_device(T) is None
    node.unlink()
    node.touch()
    assert Iscsiadm.find_device(T) == node


def test_the_by_path_link_serves_where_sysfs_shows_no_disk(iscsi_sysfs):
    disk = iscsi_sysfs.dev / "sde"
    disk.touch()
    link = iscsi_sysfs.dev / "disk" / "by-path" / f"ip-10.0.0.1:3260-iscsi-{T.iqn}-lun-0"
    link.parent.mkdir(parents=True)
    link.symlink_to("../../sde")
    assert Iscsiadm.find_device(T) == disk


def test_login_goes_on_when_sysfs_missed_a_session_that_exists(fake_run):
    fake_run.on("iscsiadm", "-m", "node")
    fake_run.on("iscsiadm", "-m", "node", "-T", T.iqn, "-p", "10.0.0.1:3260", "--login", rc=15,
                stderr="iscsiadm: default: 1 session requested, but 1 already present.")
    Iscsiadm().login(T)   # exit 15, session exists: success


def test_auth_failure_is_failed_precondition_without_secret(fake_run):
    fake_run.on("iscsiadm", "-m", "session", rc=21)
    fake_run.on("iscsiadm", "-m", "node")
    fake_run.on("iscsiadm", "-m", "node", "-T", T.iqn, "-p", "10.0.0.1:3260", "--login", rc=24,
                stderr="iscsiadm: Login failed: authorization failure\n")
    with pytest.raises(errors.CsiError) as e:
        Iscsiadm().login(T)
    assert e.value.code == errors.Code.FAILED_PRECONDITION and "CHAP" in e.value.message


def test_logout_and_delete_accept_no_records(fake_run):
    rc, _, err = recorded_failure("node_none")
    fake_run.on("iscsiadm", "-m", "node", rc=rc, stderr=err)
    Iscsiadm().logout(T.iqn)
    assert fake_run.calls == [["iscsiadm", "-m", "node", "-T", T.iqn, "--logout"],
                              ["iscsiadm", "-m", "node", "-T", T.iqn, "-o", "delete"]]


def test_one_portal_of_a_target_is_left_alone(fake_run):
    """A replaced leg of a replicated volume shares its target IQN with the leg that stays: only its portal
    is logged out of and forgotten."""
    rc, _, err = recorded_failure("node_none")
    fake_run.on("iscsiadm", "-m", "node", rc=rc, stderr=err)
    Iscsiadm().logout_portals(T.iqn, ["10.0.0.2:3260"])
    assert fake_run.calls == [["iscsiadm", "-m", "node", "-T", T.iqn, "-p", "10.0.0.2:3260", "--logout"],
                              ["iscsiadm", "-m", "node", "-T", T.iqn, "-p", "10.0.0.2:3260", "-o", "delete"]]


def test_initiator_name(tmp_path):
    f = tmp_path / "initiatorname.iscsi"
    f.write_text("## comment\nInitiatorName=iqn.1993-08.org.debian:01:abc\n")
    assert read_initiator_name(f) == "iqn.1993-08.org.debian:01:abc"
    f.write_text("nothing")
    with pytest.raises(errors.CsiError):
        read_initiator_name(f)


BROKEN_RECORD = ("iscsiadm: Could not stat /etc/iscsi/nodes//,3260,-1/default to delete node: No such file or "
                 "directory\niscsiadm: Error while adding record: encountered iSCSI database failure\n")


def test_a_record_that_a_killed_iscsiadm_truncated_is_removed_and_made_again(fake_run, tmp_path, monkeypatch):
    # Seen with 100 stages at once (tests/e2e/test_load.py): iscsiadm killed while writing a record left one
    # without a target name; every later `-o new` of that target failed with exit 6, so the volume never staged.
    from csi.node import iscsi
    db = tmp_path / "nodes"
    broken = db / T.iqn / "10.0.0.1,3260,1"   # <address>,<port>,<tpgt>, as open-iscsi names it
    broken.mkdir(parents=True)
    (broken / "default").write_text("")
    other = db / T.iqn / "10.0.0.2,3260,1"
    other.mkdir()
    monkeypatch.setattr(iscsi, "NODE_DB_DIRS", (db,))
    fake_run.on("iscsiadm", "-m", "session", rc=21)
    fake_run.on("iscsiadm", "-m", "node")
    fake_run.on("iscsiadm", "-m", "node", "-T", T.iqn, "-p", "10.0.0.1:3260", "-o", "new",
                fn=lambda argv: (6, "", BROKEN_RECORD) if (broken / "default").exists() and
                not (broken / "default").read_text() else (0, "", ""))
    Iscsiadm().login(T)
    news = [c for c in fake_run.calls if c[-2:] == ["-o", "new"]]
    # the truncated record was removed; the second `-o new` made a whole one, which the login's settings fill
    assert len(news) == 2 and (broken / "default").read_text().startswith("# BEGIN RECORD") and other.exists()
    assert fake_run.calls[-1][-1] == "--login"


def test_a_database_failure_without_a_broken_record_is_raised(fake_run, tmp_path, monkeypatch):
    from csi.node import iscsi
    from csi.runner import CommandError
    monkeypatch.setattr(iscsi, "NODE_DB_DIRS", (tmp_path / "nodes",))
    fake_run.on("iscsiadm", "-m", "session", rc=21)
    fake_run.on("iscsiadm", "-m", "node", "-T", T.iqn, "-p", "10.0.0.1:3260", "-o", "new", rc=6,
                stderr=BROKEN_RECORD)
    with pytest.raises(CommandError) as e:
        Iscsiadm().login(T)
    assert e.value.rc == 6 and sum(c[-2:] == ["-o", "new"] for c in fake_run.calls) == 1


def test_record_writes_outlive_a_spent_rpc_deadline(fake_run):
    # A call whose deadline is almost spent gives its commands the runner's 2 s floor; a record write killed by
    # it is what breaks a record (above), so record writes get RECORD_TIMEOUT_S whatever is left.
    from csi import runner
    from csi.node import iscsi
    fake_run.on("iscsiadm", "-m", "session", rc=21)
    fake_run.on("iscsiadm", "-m", "node")
    with runner.deadline(0.5):
        Iscsiadm().login(T)
        Iscsiadm().logout(T.iqn)
    writes = [t for c, t in zip(fake_run.calls, fake_run.timeouts) if "-o" in c]   # new, delete
    assert len(writes) == 2 and all(t > iscsi.RECORD_TIMEOUT_S - 1 for t in writes), writes
    others = [t for c, t in zip(fake_run.calls, fake_run.timeouts) if "-o" not in c]
    assert others and all(t <= runner.MIN_TIMEOUT for t in others)


def test_node_database_commands_of_concurrent_stages_never_overlap(fake_run):
    # open-iscsi walks every record on update / delete / login / logout / listing: one of another volume's
    # stage changing meanwhile fails the walk (exit 6). Seen with 50 stages at once per worker.
    import threading

    slow = Overlap(hold=0.002)
    rc, _, err = recorded_failure("session_none")
    fake_run.on("iscsiadm", "-m", "session", rc=rc, stderr=err)
    fake_run.on("iscsiadm", "-m", "node", fn=slow)
    targets = [Target(f"iqn.2026-11.dev.csi.lvm-iscsi:vg.lv{i}", ("10.0.0.1:3260",), 0, "u1", "secret-123456789")
               for i in range(8)]
    threads = [threading.Thread(target=lambda t=t: (Iscsiadm().login(t), Iscsiadm().logout(t.iqn))) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    node_calls = [c for c in fake_run.calls if c[:3] == ["iscsiadm", "-m", "node"]]
    assert len(node_calls) == 8 * 4   # per stage: new, login; logout, delete
    assert slow.most == 1, f"{slow.most} iscsiadm -m node commands ran at once"


def test_a_record_is_found_under_the_name_open_iscsi_gives_it(node_db):
    """<db>/<target>/<address>,<port>,<tpgt>/<iface> (idbm.c): the address and the port apart, with a comma."""
    from csi.node import noderecord
    assert noderecord.portal_prefix("10.0.0.1:3260") == "10.0.0.1,3260"
    assert noderecord.portal_prefix("[fd00::1]:3260") == "fd00::1,3260"
    v6 = node_db / T.iqn / "fd00::1,3260,1"
    v6.mkdir(parents=True)
    (v6 / "default").write_text("# BEGIN RECORD 2.1.8\n# END RECORD\n")
    (node_db / T.iqn / "fd00::10,3260,1").mkdir()     # another address that merely starts alike
    assert noderecord.record_files([node_db], T.iqn, "[fd00::1]:3260") == [v6 / "default"]
    assert noderecord.record_files([node_db], T.iqn, "10.0.0.9:3260") == []


def test_a_record_made_with_o_new_has_no_tpgt_and_is_found(node_db):
    """`iscsiadm -m node -o new -T <iqn> -p 10.0.0.1:3260` (iscsiadm 2.1.8, tpgt -1) writes the plain file
    <db>/<iqn>/10.0.0.1,3260: no tpgt, no iface directory. Looking only for "<address>,<port>,*" failed every
    NodeStageVolume of the csi-sanity lab with "iscsiadm made no node record"."""
    from csi.node import noderecord
    made = node_db / T.iqn / "10.0.0.1,3260"
    made.parent.mkdir(parents=True)
    made.write_text("# BEGIN RECORD 2.1.8\nnode.name = x\n# END RECORD\n")
    (node_db / T.iqn / "10.0.0.1,32600").write_text("another port that merely starts alike\n")
    assert noderecord.record_files([node_db], T.iqn, "10.0.0.1:3260") == [made]
    noderecord.write_settings([node_db], T.iqn, "10.0.0.1:3260", noderecord.auth_settings("u", "s"))
    assert "node.session.auth.username = u" in made.read_text()


def test_the_wait_for_a_disk_rescans_once_per_point_passed_even_after_a_slow_rescan(monkeypatch, tmp_path):
    from csi.node import iscsi
    clock = [0.0]
    monkeypatch.setattr(iscsi.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(iscsi.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    disk = tmp_path / "sdb"
    disk.touch()
    rescans = []
    tool = Iscsiadm()
    monkeypatch.setattr(tool, "find_device", lambda t, sessions=None: disk if clock[0] >= 9.0 else None)

    def rescan(iqn):   # waited 2.5 s for the node database's lock: past the next point (3 s) already
        rescans.append(round(clock[0], 2))
        clock[0] += 2.5
    monkeypatch.setattr(tool, "rescan", rescan)
    assert tool.wait_for_device(T, timeout=20) == disk
    assert len(rescans) == 2 and 1.0 <= rescans[0] < 1.1 and 7.0 <= rescans[1] < 7.1, rescans


def test_the_wait_for_a_disk_walks_every_session_only_until_the_targets_show_up(monkeypatch, iscsi_sysfs):
    """A busy worker has a hundred sessions: the 50 ms poll watches this target's session, not all of them."""
    from csi.node import iscsi
    for sid in range(1, 50):
        iscsi_sysfs.add(sid, f"iqn.2026-11.dev.csi.lvm-iscsi:vg.other{sid}", "10.0.0.1")
    polls, walks = [0], [0]
    real_walk = Iscsiadm._sessions_of

    def walk(iqn):
        walks[0] += 1
        return real_walk(iqn)

    def sleep(seconds):
        polls[0] += 1
        if polls[0] == 2:
            iscsi_sysfs.add(77, T.iqn, "10.0.0.1")       # the login's session, its disk not yet there
        if polls[0] == 6:
            iscsi_sysfs.add_disk(77, 0, "sdx")
    monkeypatch.setattr(Iscsiadm, "_sessions_of", staticmethod(walk))
    monkeypatch.setattr(iscsi.time, "sleep", sleep)
    assert Iscsiadm().wait_for_device(T, timeout=20) == iscsi_sysfs.dev / "sdx"
    assert polls[0] == 6 and walks[0] == 3, (polls, walks)
