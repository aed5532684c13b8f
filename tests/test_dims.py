"""AxisTable: unification, row-major/segment refinement, freezing, masks and coordinates."""
import numpy as np

from vitprune.deps.dims import CAT, PROD, AxisTable


def test_reshape_refines_to_common_factorisation():
    t = AxisTable()
    qkv = t.new(3 * 6 * 64)
    coarse = t.split(qkv, [3, 384], PROD)      # one view: (3, 384)
    s, h, d = t.split(qkv, [3, 6, 64], PROD)   # another: (3, heads, head_dim)
    assert t.find(coarse[0]) == t.find(s)
    assert [t.size(a) for a in t.leaves(qkv)] == [3, 6, 64]
    assert t.leaves(coarse[1]) == [t.find(h), t.find(d)]


def test_incompatible_reshapes_freeze_everything_involved():
    t = AxisTable()
    a = t.new(24)
    t.split(a, [6, 4], PROD)
    t.split(a, [4, 6], PROD)  # 4 does not divide 6: no common refinement
    assert t.is_frozen(a)
    assert all(t.frozen_reason(leaf) for leaf in t.leaves(a))


def test_prod_meeting_cat_freezes():
    t = AxisTable()
    a = t.new(8)
    t.split(a, [2, 4], PROD)
    t.split(a, [3, 5], CAT)
    assert t.is_frozen(a)


def test_mask_of_product_is_row_major():
    t = AxisTable()
    a = t.new(3 * 2 * 4)
    s, h, d = t.split(a, [3, 2, 4], PROD)
    keep_head = np.array([False, True])
    mask = t.mask(a, {t.find(h): keep_head})
    expected = np.zeros((3, 2, 4), dtype=bool)
    expected[:, 1, :] = True
    np.testing.assert_array_equal(mask, expected.ravel())
    assert t.kept_size(a, {t.find(h): 1, t.find(d): 3}) == 3 * 1 * 3


def test_coords_name_each_position():
    t = AxisTable()
    a = t.new(2 * 3)
    h, d = t.split(a, [2, 3], PROD)
    coords = t.coords(a)
    np.testing.assert_array_equal(coords[t.find(h)], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(coords[t.find(d)], [0, 1, 2, 0, 1, 2])
    b = t.concat([t.new(2), t.new(3)])
    c = t.coords(b)
    first, second = t.leaves(b)
    np.testing.assert_array_equal(c[first], [0, 1, -1, -1, -1])
    np.testing.assert_array_equal(c[second], [-1, -1, 0, 1, 2])


def test_freeze_propagates_through_unification():
    t = AxisTable()
    a, b, c = t.new(4), t.new(4), t.new(4)
    t.unify(a, b)
    t.freeze(c, "model output")
    t.unify(b, c)
    assert t.frozen_reason(a) == "model output"


def test_unify_size_mismatch_raises():
    import pytest

    from vitprune.deps.dims import DimMismatch

    t = AxisTable()
    with pytest.raises(DimMismatch):
        t.unify(t.new(3), t.new(4))
