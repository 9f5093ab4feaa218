"""iscsiadm argv, exit-code meanings and session parsing (recorded from open-iscsi in UML)."""

import pytest

from csi import errors
from csi.node.iscsi import Iscsiadm, Target, parse_sessions, read_initiator_name
from tests.unit.conftest import recorded_failure

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


def test_login_sets_manual_startup_and_chap_and_masks_secrets(fake_run, caplog):
    caplog.set_level("DEBUG")
    rc, _, err = recorded_failure("session_none")
    fake_run.on("iscsiadm", "-m", "session", rc=rc, stderr=err)
    fake_run.on("iscsiadm", "-m", "node")
    Iscsiadm().login(T)
    base = ["iscsiadm", "-m", "node", "-T", T.iqn, "-p", "10.0.0.1:3260"]
    upd = lambda k, v: base + ["-o", "update", "-n", k, "-v", v]  # noqa: E731
    assert fake_run.calls[1:] == [base + ["-o", "new"], upd("node.startup", "manual"),
                                  upd("node.conn[0].timeo.login_timeout", "10"),
                                  upd("node.session.initial_login_retry_max", "2"),
                                  upd("node.session.auth.authmethod", "CHAP"),
                                  upd("node.session.auth.username", "u1"),
                                  upd("node.session.auth.password", "secret-123456789"),
                                  upd("node.session.auth.username_in", "t1"),
                                  upd("node.session.auth.password_in", "mutual-secret-9876"),
                                  base + ["--login"]]
    assert "secret-123456789" not in caplog.text and "mutual-secret-9876" not in caplog.text


def test_login_skipped_when_session_exists(fake_run):
    fake_run.on("iscsiadm", "-m", "session", stdout=SESSION_OUT)
    fake_run.on("iscsiadm", "-m", "node")
    Iscsiadm().login(T)
    assert not any("--login" in c for c in fake_run.calls)


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


def test_initiator_name(tmp_path):
    f = tmp_path / "initiatorname.iscsi"
    f.write_text("## comment\nInitiatorName=iqn.1993-08.org.debian:01:abc\n")
    assert read_initiator_name(f) == "iqn.1993-08.org.debian:01:abc"
    f.write_text("nothing")
    with pytest.raises(errors.CsiError):
        read_initiator_name(f)
