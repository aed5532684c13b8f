"""Image data for calibration and fine-tuning, through timm's dataset and transform utilities.

``DIR`` is an image folder (``DIR/<class>/<image>``), or a folder with ``train``/``val`` sub-folders
in that layout; anything ``timm.data.create_dataset`` reads as a folder works.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import torch
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader

from vitprune.errors import InputError


def image_folder(root: str | os.PathLike, input_size: tuple[int, int, int], *, split: str | None = None,
                 train: bool = False):
    """A timm image-folder dataset with timm's eval (or train) transform at ``input_size``."""
    root = os.fspath(root)
    if split and os.path.isdir(os.path.join(root, split)):
        root = os.path.join(root, split)
    if not os.path.isdir(root):
        raise InputError(f"--data {root!r} is not a directory")
    try:
        dataset = create_dataset("", root=root, is_training=train)
    except Exception as e:  # timm raises several kinds for empty/odd folders
        raise InputError(f"cannot read images from {root}: {' '.join(str(e).split())[:200]}") from e
    if len(dataset) == 0:
        raise InputError(f"no images found under {root} (expected DIR/<class>/<image files>)")
    # timm's eval transform resizes by 1/0.875 and centre-crops: right for 224-pixel photos, but on
    # small images (digits at 32 px) it cuts away the content, so those are only resized
    crop_pct = 1.0 if max(input_size[1:]) <= 64 else None
    dataset.transform = create_transform(input_size=input_size, is_training=train, crop_pct=crop_pct)
    return dataset


def loader(root: str | os.PathLike, input_size: tuple[int, int, int], *, batch_size: int,
           split: str | None = None, train: bool = False, shuffle: bool = False, seed: int = 0,
           workers: int = 0) -> DataLoader:
    dataset = image_folder(root, input_size, split=split, train=train)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
                      drop_last=False)


def calibration_batches(root: str | os.PathLike, input_size: tuple[int, int, int], *, batches: int,
                        batch_size: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` shuffled (images, labels) batches from the train split (or the folder itself)."""
    data = loader(root, input_size, batch_size=batch_size, split="train", shuffle=True, seed=seed)
    for i, (images, labels) in enumerate(data):
        if i >= batches:
            break
        yield images, labels


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels or None)`` from a batch given as images alone or as ``(images, labels, ...)``:
    the one reading of a batch for calibration, the depth search and fine-tuning."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise InputError(f"a batch must be an image tensor or (images, labels), got {type(batch).__name__}")


def images_only(batches: Iterable) -> list[torch.Tensor]:
    return [split_batch(b)[0] for b in batches]
