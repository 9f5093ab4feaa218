"""The runner with real processes: exit codes, timeouts from the deadline, missing tools, masked secrets."""

import time

import pytest

from csi import errors, runner


def test_ok_and_output_apart():
    r = runner.run(["sh", "-c", "echo out; echo err >&2"])
    assert (r.rc, r.stdout, r.stderr) == (0, "out\n", "err\n")


def test_failure_carries_argv_rc_and_stderr():
    with pytest.raises(runner.CommandError) as e:
        runner.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert e.value.rc == 3 and "boom" in e.value.stderr and e.value.argv[0] == "sh"
    assert runner.run(["sh", "-c", "exit 21"], ok_codes=(0, 21)).rc == 21


def test_locale_is_c():
    assert runner.run(["sh", "-c", "echo $LC_ALL"]).stdout.strip() == "C"


def test_deadline_bounds_the_command():
    started = time.monotonic()
    with runner.deadline(0.5), pytest.raises(runner.CommandTimeout):
        runner.run(["sleep", "30"])
    assert time.monotonic() - started < runner.MIN_TIMEOUT + 2
    code, _ = errors.status_of(runner.CommandTimeout(["x"], None, ""))
    assert code == errors.Code.DEADLINE_EXCEEDED


def test_a_command_that_must_finish_outlives_the_deadline():
    started = time.monotonic()
    with runner.deadline(0.2):
        assert runner.run(["sh", "-c", "sleep 2.5; echo done"], finish=True).stdout == "done\n"
        with pytest.raises(runner.CommandTimeout):
            runner.run(["sleep", "30"], finish=True, timeout=0.5)     # its own bound still holds
    assert 2.5 <= time.monotonic() - started < 10
    with runner.deadline(0.1):
        time.sleep(0.2)
        with pytest.raises(runner.CommandTimeout) as e:
            runner.run(["true"], finish=True)      # nobody waits for its answer any more: not started
    assert "not started" in str(e.value)


def test_lvm_changes_are_never_killed_at_the_deadline_and_reports_are(fake_run, tmp_path):
    from csi.storage.lvm import Lvm
    fake_run.on("lvextend")
    fake_run.on("lvs", stdout='{"report": [{"lv": []}]}')
    lvm = Lvm(tmp_path)
    with runner.deadline(3.0):
        lvm.extend("vg", "lv", 1 << 30)
        lvm.lv("vg", "lv")
    assert fake_run.calls[0][0] == "lvextend" and fake_run.timeouts[0] == runner.FINISH_TIMEOUT
    assert fake_run.calls[1][0] == "lvs" and fake_run.timeouts[1] <= 3.0


def test_missing_tool_is_a_clear_failed_precondition():
    with pytest.raises(runner.CommandNotFound) as e:
        runner.run(["no-such-tool-xyz", "a"])
    code, message = errors.status_of(e.value)
    assert code == errors.Code.FAILED_PRECONDITION and "no-such-tool-xyz is not installed" in message


def test_secrets_never_reach_errors_or_logs(caplog):
    caplog.set_level("DEBUG")
    with pytest.raises(runner.CommandError) as e:
        runner.run(["sh", "-c", "echo $0 >&2; exit 1", "s3cr3t-value"], secrets=["s3cr3t-value"])
    assert "s3cr3t-value" not in str(e.value) and "s3cr3t-value" not in e.value.stderr
    assert "s3cr3t-value" not in " ".join(e.value.argv)
    runner.run(["true", "s3cr3t-value"], secrets=["s3cr3t-value"])
    assert "s3cr3t-value" not in caplog.text and "***" in caplog.text


def test_unknown_exceptions_map_to_internal_not_unknown():
    code, message = errors.status_of(ValueError("bad"))
    assert code == errors.Code.INTERNAL and "ValueError" in message


def test_no_deadline_reported_as_huge_number_means_default():
    with runner.deadline(1e300):
        assert runner.time_left() == runner.DEFAULT_TIMEOUT
    with runner.deadline(None):
        assert runner.time_left() == runner.DEFAULT_TIMEOUT
    with runner.deadline(30):
        assert 29 < runner.time_left() <= 30


def test_secrets_are_masked_in_what_a_timed_out_command_printed():
    """A command killed at its deadline carries what it printed so far: masked like any other failure's."""
    with runner.deadline(0.5), pytest.raises(runner.CommandTimeout) as e:
        runner.run(["sh", "-c", "echo \"login with $0\" >&2; echo \"out $0\"; exec sleep 30", "s3cr3t-value"],
                   secrets=["s3cr3t-value"])
    assert "login with ***" in e.value.stderr and "out ***" in e.value.stdout
    assert "s3cr3t-value" not in f"{e.value} {e.value.stderr} {e.value.stdout} {' '.join(e.value.argv)}"


def test_a_command_run_through_nsenter_is_named_with_where_it_ran():
    # `--iscsiadm host` runs `nsenter --target 1 --mount -- iscsiadm ...`: the error names iscsiadm and its
    # subcommand, not nsenter's own options; a tool missing there is a clear FAILED_PRECONDITION, not exit 127
    assert runner.described(["nsenter", "--target", "1", "--mount", "--", "iscsiadm", "-m", "node", "-T", "x"]) \
        == "iscsiadm -m node ... (in the host's namespaces)"
    assert runner.described(["iscsiadm", "-m", "session"]) == "iscsiadm -m session"
    with pytest.raises(runner.CommandNotFound) as e:
        runner.run(["nsenter", "--", "no-such-tool-xyz", "-m", "session"])
    code, message = errors.status_of(e.value)
    assert code == errors.Code.FAILED_PRECONDITION
    assert message.startswith("no-such-tool-xyz -m session (in the host's namespaces): not installed there: ")
