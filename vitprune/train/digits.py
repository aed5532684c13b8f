"""scikit-learn's digits: a real image data set that ships inside an installed package (no download).

1,797 grayscale 8×8 images of handwritten digits, 10 classes (~180 each), pixel values 0–16 (ink
bright on a dark background). For a ViT they are upsampled with bilinear interpolation to
``image_size`` × ``image_size``, repeated to 3 channels and normalised with timm's ImageNet mean/std
(the statistics timm's transforms use, so tensors from :func:`digits_splits` and images read back from
:func:`export_image_folder` through ``vitprune.train.data`` live on the same scale).

The test split is stratified and fixed by ``seed`` and ``test_fraction`` (defaults: 360 test images,
36 per class; 1,437 train images)::

    train_ds, test_ds = digits_splits(image_size=32)
    train_loader, test_loader = digits_loaders(batch_size=64)
    export_image_folder("digits", image_size=32)   # digits/train/<class>/*.png, digits/val/<class>/*.png

scikit-learn is imported lazily; without it these functions raise :class:`InputError`.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, TensorDataset

from vitprune.errors import InputError

NUM_CLASSES = 10
CLASS_NAMES = tuple(str(i) for i in range(NUM_CLASSES))


_MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits: images ``[N, 8, 8]`` float32 in [0, 1] and labels ``[N]`` int64
    (shared with :mod:`vitprune.train.mosaic`, which builds its task from the same images)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is an optional dependency (the dev extra)
        raise InputError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


def _validate(image_size: Any, test_fraction: Any, seed: Any) -> None:
    if not (isinstance(image_size, int) and not isinstance(image_size, bool) and image_size >= 8):
        raise InputError(f"image_size must be an integer >= 8 (the digits are 8×8), got {image_size!r}")
    if not (isinstance(test_fraction, (int, float)) and not isinstance(test_fraction, bool)
            and 0.0 < test_fraction < 1.0):
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise InputError(f"seed must be an integer, got {seed!r}")


def split_indices(labels: np.ndarray, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices, stratified by ``labels`` and fixed by ``seed``: disjoint, covering all."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    return np.sort(train), np.sort(test)


def _upsample(images: np.ndarray, image_size: int) -> torch.Tensor:
    """[N, 8, 8] in [0, 1] → [N, 3, S, S] in [0, 1] (bilinear), not yet normalised."""
    x = torch.from_numpy(images).unsqueeze(1)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0).expand(-1, 3, -1, -1).contiguous()


def normalise(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` in [0, 1] → timm's ImageNet normalisation (what timm's transforms apply, so
    tensors and exported PNGs read back through ``vitprune.train.data`` agree)."""
    return (x - _MEAN) / _STD


def _pixels_and_splits(image_size: int, seed: int, test_fraction: float):
    _validate(image_size, test_fraction, seed)
    images, labels = load_digit_images()
    train, test = split_indices(labels, seed, test_fraction)
    return _upsample(images, image_size), torch.from_numpy(labels), train, test


def digits_splits(image_size: int = 32, seed: int = 0,
                  test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """``(train_ds, test_ds)``: TensorDatasets of ``(image [3, S, S] float32, label int64)``."""
    pixels, labels, train, test = _pixels_and_splits(image_size, seed, test_fraction)
    x = normalise(pixels)
    return (TensorDataset(x[train], labels[train]), TensorDataset(x[test], labels[test]))


def digits_loaders(batch_size: int, image_size: int = 32, seed: int = 0, test_fraction: float = 0.2,
                   workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)``: the train loader shuffles (seeded), the test loader does not."""
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    train_ds, test_ds = digits_splits(image_size, seed, test_fraction)
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=g, num_workers=workers),
            DataLoader(test_ds, batch_size=batch_size, shuffle=False, num_workers=workers))


def export_image_folder(root: str | os.PathLike, image_size: int = 32, seed: int = 0,
                        test_fraction: float = 0.2) -> dict[str, int]:
    """Write the splits as 8-bit grayscale PNGs: ``root/train/<class>/<index>.png`` and
    ``root/val/<class>/<index>.png`` (index = position in scikit-learn's array), the layout timm's
    image-folder dataset (``--data DIR``) reads. Returns the number of images per split.

    The images are the upsampled pixels before normalisation, rounded to 8 bits; timm's loader
    converts them to RGB. Existing files of the same name are overwritten.
    """
    pixels, labels, train, test = _pixels_and_splits(image_size, seed, test_fraction)
    gray = (pixels[:, 0] * 255.0).round_().to(torch.uint8).numpy()
    counts = {}
    for split, indices in (("train", train), ("val", test)):
        for name in CLASS_NAMES:
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
        for i in indices:
            path = os.path.join(root, split, CLASS_NAMES[int(labels[i])], f"{int(i):04d}.png")
            Image.fromarray(gray[i]).save(path)
        counts[split] = len(indices)
    return counts
