"""scikit-learn's digits as ViT-ready tensors and as a timm image folder (vitprune.train.digits)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from vitprune.errors import InputError

pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402

from vitprune.train.digits import digits_loaders, digits_splits, export_image_folder  # noqa: E402

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def splits():
    return digits_splits()


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: back to [0, 1] intensities."""
    return x * STD + MEAN


def test_split_sizes_shapes_and_stratification(splits):
    train, test = splits
    assert (len(train), len(test)) == (1437, 360)
    x, y = train.tensors
    assert x.shape == (1437, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    labels = load_digits().target
    expected = np.bincount(labels) * 0.2
    assert np.abs(np.bincount(test.tensors[1].numpy(), minlength=10) - expected).max() <= 1.0
    assert set(y.tolist()) == set(range(10))


def test_split_is_fixed_disjoint_and_the_images_are_the_digits(splits):
    train, test = splits
    again = digits_splits()
    assert torch.equal(again[1].tensors[0], test.tensors[0]) and torch.equal(again[1].tensors[1], test.tensors[1])
    other = digits_splits(seed=1)[1]
    assert not torch.equal(other.tensors[1], test.tensors[1])
    # every image is a scikit-learn digit upsampled bilinearly (the spec), each source image is used
    # exactly once, and train and test share none
    raw = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16.0
    up = torch.nn.functional.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False).flatten(1)
    found = []
    for ds in (train, test):
        images = pixels(ds.tensors[0])[:, 0].flatten(1)
        index = torch.cdist(images, up).argmin(dim=1)
        assert (images - up[index]).abs().max() < 1e-5
        found.append(set(index.tolist()))
    assert not found[0] & found[1]
    assert len(found[0]) + len(found[1]) == 1797


def test_channels_are_equal_grayscale_and_normalised(splits):
    x = pixels(splits[0].tensors[0])
    assert torch.allclose(x[:, 0], x[:, 1], atol=1e-5) and torch.allclose(x[:, 0], x[:, 2], atol=1e-5)
    assert x.min() > -1e-5 and x.max() < 1 + 1e-5
    assert x[:, :, 0, 0].abs().max() < 1e-5  # the corner is background (0) in every digit
    assert x.max() > 0.99  # full-intensity ink survives the upsampling


def test_other_sizes_and_bad_arguments():
    train, _ = digits_splits(image_size=16, test_fraction=0.5)
    assert train.tensors[0].shape[1:] == (3, 16, 16) and len(train) in (898, 899)
    for bad in (dict(image_size=4), dict(image_size=32.0), dict(test_fraction=0.0),
                dict(test_fraction=1.5), dict(seed="0")):
        with pytest.raises(InputError):
            digits_splits(**bad)
    with pytest.raises(InputError):
        digits_loaders(batch_size=0)


def test_loaders_shuffle_by_seed_and_keep_the_test_order():
    train, test = digits_loaders(batch_size=50)
    images, labels = next(iter(train))
    assert images.shape == (50, 3, 32, 32) and labels.shape == (50,)
    assert torch.equal(next(iter(digits_loaders(batch_size=50)[0]))[1], labels)  # same seed, same order
    assert not torch.equal(next(iter(digits_loaders(batch_size=50, seed=1)[0]))[1], labels)
    assert torch.equal(torch.cat([y for _, y in test]), digits_splits()[1].tensors[1])


def test_export_image_folder_round_trips_through_timm(tmp_path, splits):
    from vitprune.train.data import image_folder

    counts = export_image_folder(tmp_path, image_size=32)
    assert counts == {"train": 1437, "val": 360}
    for split, n in counts.items():
        assert sorted(p.name for p in (tmp_path / split).iterdir()) == [str(i) for i in range(10)]
        assert len(list((tmp_path / split).rglob("*.png"))) == n
    # the PNGs hold the same pixels as the tensors (8-bit rounding aside), in their class folders
    test_x, test_y = splits[1].tensors
    files = sorted((tmp_path / "val").rglob("*.png"), key=lambda p: p.name)
    for i in (0, 17, 359):
        img = np.asarray(Image.open(files[i]))
        assert img.shape == (32, 32) and img.dtype == np.uint8
        assert int(files[i].parent.name) == int(test_y[i])
        assert np.abs(img / 255.0 - pixels(test_x[i])[0].numpy()).max() <= 0.5 / 255 + 1e-6
    # timm reads it as a 10-class image folder, labels from the folder names
    ds = image_folder(tmp_path, (3, 32, 32), split="val")
    assert len(ds) == 360
    labels = torch.tensor([ds[i][1] for i in range(0, 360, 37)])
    image, _ = ds[0]
    assert image.shape == (3, 32, 32)
    assert torch.equal(labels, torch.tensor(sorted(test_y.tolist()))[::37])
