import pytest

from csi import errors
from csi.controller.scheduler import Candidate, choose, round_up

MiB, GiB = 1 << 20, 1 << 30
EXT = 4 * MiB


def cands():
    return [Candidate("s1", "a", "thin", True, 10 * GiB, EXT), Candidate("s1", "a", "thick", False, 3 * GiB, EXT),
            Candidate("s2", "b", "thin", True, 20 * GiB, EXT), Candidate("s3", "b", "thin", True, 20 * GiB, EXT)]


def test_most_free_space_wins_with_deterministic_tie_break():
    p = choose(cands(), required=GiB, thin=True)
    assert (p.candidate.node, p.candidate.pool) == ("s2", "thin")
    assert choose(list(reversed(cands())), required=GiB, thin=True).candidate.node == "s2"


def test_size_is_rounded_to_the_extent():
    assert round_up(1, EXT) == EXT
    assert round_up(EXT, EXT) == EXT
    assert choose(cands(), required=GiB + 1).size == GiB + EXT


def test_pool_type_and_zone_filters():
    assert choose(cands(), required=GiB, pool="thick").candidate.pool == "thick"
    assert choose(cands(), required=GiB, thin=False).candidate.pool == "thick"
    assert choose(cands(), required=GiB, requisite_zones=["a"], thin=True).candidate.node == "s1"


def test_preferred_zone_comes_before_free_space():
    p = choose(cands(), required=GiB, thin=True, requisite_zones=["a", "b"], preferred_zones=["a", "b"])
    assert p.candidate.node == "s1"


def test_nothing_fits_says_why():
    with pytest.raises(errors.CsiError) as e:
        choose(cands(), required=50 * GiB)
    assert e.value.code == errors.Code.RESOURCE_EXHAUSTED
    assert "largest space available" in e.value.message and str(20 * GiB) in e.value.message
    with pytest.raises(errors.CsiError) as e:
        choose(cands(), required=GiB, requisite_zones=["zz"])
    assert e.value.code == errors.Code.RESOURCE_EXHAUSTED and "outside the zones zz" in e.value.message
    with pytest.raises(errors.CsiError) as e:
        choose(cands(), required=GiB, pool="nope")
    assert "not pool 'nope'" in e.value.message


def test_limit_below_rounded_size_is_out_of_range():
    with pytest.raises(errors.CsiError) as e:
        choose(cands(), required=GiB + 1, limit=GiB + 2)
    assert e.value.code == errors.Code.OUT_OF_RANGE


def test_no_candidates_at_all():
    with pytest.raises(errors.CsiError) as e:
        choose([], required=GiB)
    assert e.value.code == errors.Code.RESOURCE_EXHAUSTED
