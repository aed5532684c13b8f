"""Digit mosaics (vitprune.train.mosaic): the bundled task that separates pruning methods."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitprune.errors import InputError

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402

from vitprune.train.digits import split_indices  # noqa: E402
from vitprune.train.mosaic import (EDGES, WEIGHTS, mosaic_label, mosaic_loaders,  # noqa: E402
                                   mosaic_splits)

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def splits():
    return mosaic_splits()


@pytest.fixture(scope="module")
def sk():
    return load_digits()


def every_combination() -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(10)] * 4, indexing="ij"), -1).reshape(-1, 4)


def test_default_sizes_shapes_and_types(splits):
    train, test = splits
    assert (len(train), len(test)) == (20_000, 2_000)
    x, y = test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 and y.ndim == 0
    big_train, big_test = mosaic_splits(image_size=64, train_size=50, test_size=30)
    assert big_train[3][0].shape == (3, 64, 64) and (len(big_train), len(big_test)) == (50, 30)


def test_labels_are_exactly_balanced_and_follow_the_rule(splits, sk):
    for ds in splits:
        counts = np.bincount(ds.labels.numpy(), minlength=10)
        assert counts.tolist() == [len(ds) // 10] * 10
        # the digit classes recorded are the images' true classes, and the label is the stated rule
        assert np.array_equal(sk.target[ds.sources.numpy()], ds.digits.numpy())
        s = ds.digits.numpy() @ np.array([1, 2, 3, 4])
        assert np.array_equal(ds.labels.numpy(), np.searchsorted(EDGES, s, side="right"))
    assert mosaic_label([[0, 0, 0, 0], [9, 9, 9, 9], [0, 0, 0, 6], [3, 0, 0, 7]]).tolist() == [0, 9, 1, 2]


def test_every_quadrant_and_its_position_matter():
    combos = every_combination()
    labels = mosaic_label(combos)
    changed = []
    for q in range(4):  # +1 on one quadrant's digit (where it stays a digit)
        ok = combos[:, q] < 9
        bumped = combos[ok].copy()
        bumped[:, q] += 1
        changed.append(float((mosaic_label(bumped) != labels[ok]).mean()))
    # every quadrant changes the class, and a heavier quadrant more often (weights 1 < 2 < 3 < 4)
    assert all(c > 0.1 for c in changed) and changed == sorted(changed), changed
    swapped = combos[:, [3, 1, 2, 0]]  # top-left ↔ bottom-right
    differ = combos[:, 0] != combos[:, 3]
    assert (mosaic_label(swapped)[differ] != labels[differ]).mean() > 0.5
    assert WEIGHTS == (1, 2, 3, 4)


def test_train_and_test_digits_come_from_disjoint_pools(splits, sk):
    train, test = splits
    used_train, used_test = set(train.sources.flatten().tolist()), set(test.sources.flatten().tolist())
    assert not used_train & used_test
    pool_train, pool_test = split_indices(sk.target, 0, 0.3)
    assert used_test <= set(pool_test.tolist()) and used_train <= set(pool_train.tolist())
    assert len(used_test) > 0.9 * len(pool_test)  # 8,000 draws reach nearly every test digit image


def test_deterministic_given_the_seed(splits):
    train, test = splits
    again_train, again_test = mosaic_splits()
    assert torch.equal(again_test.sources, test.sources) and torch.equal(again_train.labels, train.labels)
    assert torch.equal(again_test[5][0], test[5][0])
    other = mosaic_splits(seed=1, train_size=100, test_size=100)[1]
    assert not torch.equal(other.sources, test.sources[:100])


def test_pixels_are_the_four_upsampled_digits_normalised(splits, sk):
    test = splits[1]
    raw = torch.from_numpy(sk.images).float().unsqueeze(1) / 16.0
    tiles = torch.nn.functional.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    for i in (0, 7, 1999):
        x, _ = test[i]
        gray = x * STD + MEAN
        assert torch.allclose(gray[0], gray[1], atol=1e-5) and torch.allclose(gray[0], gray[2], atol=1e-5)
        src = test.sources[i]
        quadrants = (gray[0, :16, :16], gray[0, :16, 16:], gray[0, 16:, :16], gray[0, 16:, 16:])
        for q, pixels in enumerate(quadrants):
            assert torch.allclose(pixels, tiles[src[q]].clamp(0, 1), atol=1e-5)


def test_loaders_shuffle_by_seed_and_keep_the_test_order():
    train, test = mosaic_loaders(batch_size=40, train_size=200, test_size=100)
    images, labels = next(iter(train))
    assert images.shape == (40, 3, 32, 32) and labels.shape == (40,)
    again = mosaic_loaders(batch_size=40, train_size=200, test_size=100)[0]
    assert torch.equal(next(iter(again))[1], labels)
    assert torch.equal(torch.cat([y for _, y in test]), test.dataset.labels)


@pytest.mark.parametrize("bad", [dict(image_size=15), dict(image_size=34.0), dict(image_size=8), dict(image_size=True),
                                 dict(train_size=5), dict(test_size="2000"), dict(seed="0"),
                                 dict(digit_test_fraction=1.0), dict(digit_test_fraction=0)])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(InputError) as e:
        mosaic_splits(**bad)
    assert str(e.value).startswith(next(iter(bad))) and "\n" not in str(e.value)


def test_bad_label_input_and_batch_size_are_refused():
    for digits in ([1, 2, 3, 4], [[1, 2, 3]], [[1, 2, 3, 10]], [[-1, 0, 0, 0]]):
        with pytest.raises(InputError):
            mosaic_label(digits)
    with pytest.raises(InputError):
        mosaic_loaders(batch_size=0)


def test_materialized_dataset_holds_the_same_items(splits):
    """materialize() composes every mosaic at once: the same tensors as item-by-item access."""
    _, test = splits
    dense = test.materialize()
    assert len(dense) == len(test)
    for i in (0, 1, 777, len(test) - 1):
        image, label = test[i]
        dense_image, dense_label = dense[i]
        assert torch.equal(image, dense_image) and int(label) == int(dense_label)


def test_scattered_mosaics_put_each_digit_in_its_recorded_cell_of_its_quadrant():
    """grid=8: 64 cells of 8×8 pixels (the digits' own size); each quadrant's digit lies in the cell
    ``cells`` records, every other cell holds only noise of at most ``background``."""
    train, test = mosaic_splits(64, train_size=40, test_size=20, grid=8, background=0.15)
    images = load_digits().images / 16.0
    px = train.pixels(torch.arange(len(train))).numpy()
    assert px.shape == (40, 64, 64) and train.cells.shape == (40, 4) and int(train.cells.max()) < 16
    for n in range(len(train)):
        occupied = set()
        for q in range(4):
            cell = int(train.cells[n, q])
            r, c = (q // 2) * 4 + cell // 4, (q % 2) * 4 + cell % 4
            occupied.add((r, c))
            tile = px[n, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
            digit = images[int(train.sources[n, q])]
            assert np.all(tile >= digit - 1e-6) and np.all(tile <= np.maximum(digit, 0.15) + 1e-6)
        for r in range(8):
            for c in range(8):
                if (r, c) not in occupied:
                    assert px[n, 8 * r:8 * r + 8, 8 * c:8 * c + 8].max() <= 0.15 + 1e-6
    # the digits move from mosaic to mosaic (64 tokens, 16 places per digit)
    assert len({tuple(c) for c in train.cells.tolist()}) > 30
    assert torch.equal(train.materialize().tensors[0][:5], train.images(torch.arange(5)))


@pytest.mark.parametrize("kwargs, field", [(dict(grid=3), "grid"), (dict(grid=8, image_size=32), "image_size"),
                                           (dict(background=1.5), "background")])
def test_scattered_mosaic_settings_are_checked(kwargs, field):
    with pytest.raises(InputError, match=field):
        mosaic_splits(**{"image_size": 64, **kwargs})
