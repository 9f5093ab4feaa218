import pytest

from csi import errors, ids


def test_lv_name_is_deterministic_and_valid_for_lvm():
    a = ids.lv_name("c1", "pvc-0f3e1c9a-1111-2222-3333-444455556666")
    assert a == ids.lv_name("c1", "pvc-0f3e1c9a-1111-2222-3333-444455556666")
    assert a.startswith("c1-pvc-0f3e1c9a-1111-2222-3333-44445555")
    ids.check_lvm_name(a, "lv")
    assert len(a) <= 64


def test_lv_name_separates_clusters_kinds_and_lookalike_names():
    names = {ids.lv_name("c1", "a b"), ids.lv_name("c1", "a_b"), ids.lv_name("c2", "a b"),
             ids.lv_name("c1", "a b", kind="snapshot")}
    assert len(names) == 4


@pytest.mark.parametrize("name", ["-rf", "../../etc", "snapshot", "x" * 128, "$(reboot)", "ü", "..", "pvmove0"])
def test_lv_name_of_hostile_names_is_safe(name):
    lv = ids.lv_name("c1", name)
    ids.check_lvm_name(lv, "lv")
    assert not lv.startswith(("-", "snapshot", "pvmove"))
    assert all(c.isalnum() or c in "+_.-" for c in lv)


def test_volume_id_round_trip():
    ref = ids.LvRef("storage-1", "csi-vg", ids.lv_name("c1", "pvc-1"))
    text = ref.encode()
    assert text.startswith("v1:storage-1:csi-vg:c1-pvc-1-")
    assert ids.parse_id(text) == ref
    assert len(text) <= 128


@pytest.mark.parametrize("bad", ["", "v1:a:b", "v2:a:b:c", "s1:n:vg:lv", "v1:UPPER:vg:lv", "v1:n:vg:-lv",
                                 "v1:n:vg:lv:extra", "v1:" + "n" * 200 + ":vg:lv", "fake-volume-id",
                                 "v1:n:v g:lv"])
def test_parse_id_refuses_what_we_never_made(bad):
    assert ids.parse_id(bad) is None


def test_snapshot_ids_are_not_volume_ids():
    ref = ids.LvRef("n1", "vg", "lv", kind="snapshot")
    assert ids.parse_id(ref.encode()) is None
    assert ids.parse_id(ref.encode(), kind="snapshot") == ref


def test_target_iqn_is_a_valid_iqn():
    iqn = ids.target_iqn("csi-vg", ids.lv_name("c1", "My_PVC+x"))
    assert iqn.startswith(ids.IQN_PREFIX)
    assert ids.is_iqn(iqn)
    assert iqn == iqn.lower()


@pytest.mark.parametrize("value,ok", [("iqn.2026-11.dev.csi.lvm-iscsi.lab:worker-1", True),
                                      ("iqn.1993-08.org.debian:01:abcdef", True),
                                      ("some-fake-node-id", False), ("iqn.2026-11.x:-a;reboot", False),
                                      ("iqn.2026-11.x: space", False), ("", False)])
def test_is_iqn(value, ok):
    assert ids.is_iqn(value) is ok


def test_request_name_checks():
    with pytest.raises(errors.CsiError) as e:
        ids.check_request_name("")
    assert e.value.code == errors.Code.INVALID_ARGUMENT
    with pytest.raises(errors.CsiError):
        ids.check_request_name("x" * 129)
    with pytest.raises(errors.CsiError):
        ids.check_request_name("a\nb")
    assert ids.check_request_name("pvc-1") == "pvc-1"


@pytest.mark.parametrize("cid", ["", "A", "-x", "x" * 17, "snapshot", "a_b"])
def test_cluster_id_rules(cid):
    with pytest.raises(ValueError):
        ids.check_cluster_id(cid)
