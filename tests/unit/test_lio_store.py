"""A block backstore whose device is busy when it is enabled (csi/storage/lio.py _make_store): tried again, then
ABORTED for the provisioner to retry, never INTERNAL; other failures are not retried."""

from __future__ import annotations

import errno

import pytest

from csi import errors
from csi.storage import lio


class Rts:
    def __init__(self, failures):
        self.failures, self.made = list(failures), []

    def BlockStorageObject(self, name, dev, wwn):   # noqa: N802 - rtslib's name
        if self.failures:
            raise self.failures.pop(0)
        self.made.append((name, dev, wwn))
        return name


def busy():
    return OSError(errno.EBUSY, "Device or resource busy")


@pytest.fixture(autouse=True)
def no_wait(monkeypatch):
    monkeypatch.setattr(lio.time, "sleep", lambda s: None)


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
