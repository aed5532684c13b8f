"""Image data for calibration and fine-tuning, through timm's dataset and transform utilities.

``DIR`` is an image folder (``DIR/<class>/<image>``), or a folder with ``train``/``val`` sub-folders
in that layout (timm's: class = the folder an image is in, timm's image file types). Classes are
labelled by name: a validation folder takes its training folder's labels, and one with a class the
training folder lacks is refused. An image that cannot be decoded is refused, naming it, unless the
caller asks to skip such images (then they are counted). Images are converted to RGB (or grayscale
for a 1-channel model): grayscale, palette and RGBA files all work.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Sequence

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.readers.reader_image_folder import find_images_and_targets
from torch.utils.data import DataLoader, Dataset

from vitprune.errors import InputError


#: The PIL mode images are read in, by the model's input channels: grayscale, palette, RGBA, CMYK, 16-bit
#: files are all converted (RGBA drops its alpha), so any image PIL reads feeds a 1- or 3-channel model.
IMAGE_MODES: dict[int, str] = {1: "L", 3: "RGB"}
#: ImageNet's mean and std for 3 channels (timm's default), their averages for one (grayscale).
_NORMALIZE = {3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), 1: ((0.449,), (0.226,))}
_SKIP_HINT = "pass --skip-bad-images to leave unreadable images out (they are counted in the report)"


class ImageFolder(Dataset):
    """``(image, label)`` pairs of an image folder (``ROOT/<class>/<image>``, timm's layout and file
    types): a file that cannot be decoded is an :class:`InputError` naming it, never skipped
    silently (timm's ``ImageDataset`` skips it with a log line). ``skipped`` lists the files left
    out on request (``skip_bad=True`` in :func:`image_folder`)."""

    def __init__(self, root: str, samples: list[tuple[str, int]], class_to_idx: dict[str, int], mode: str,
                 transform: Any = None, skipped: Sequence[str] = ()) -> None:
        self.root, self.samples, self.class_to_idx, self.mode = root, samples, class_to_idx, mode
        self.transform, self.skipped = transform, list(skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        image = read_image(path, self.mode)
        return (self.transform(image) if self.transform is not None else image), target


def read_image(path: str, mode: str = "RGB") -> Image.Image:
    """The decoded pixels of ``path`` in ``mode``; :class:`InputError` naming the file otherwise."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)  # decodes every pixel: a truncated file fails here, not later
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {path} ({type(e).__name__}: {' '.join(str(e).split())[:120]}); "
                         f"replace or remove it, or {_SKIP_HINT}") from e


def _image_mode(input_size: tuple[int, int, int]) -> str:
    mode = IMAGE_MODES.get(int(input_size[0]))
    if mode is None:
        raise InputError(f"the model takes {input_size[0]}-channel input; an image folder gives grayscale (1) or "
                         f"RGB (3) images, so --data cannot feed it")
    return mode


def _readable(samples: list[tuple[str, int]], mode: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(the samples that decode, the files that do not): every image is decoded once, up front."""
    good, bad = [], []
    for path, target in samples:
        try:
            read_image(path, mode)
        except InputError:
            bad.append(path)
            continue
        good.append((path, target))
    return good, bad


def image_folder(root: str | os.PathLike, input_size: tuple[int, int, int], *, split: str | None = None,
                 train: bool = False, class_to_idx: dict[str, int] | None = None, labels_from: str = "",
                 skip_bad: bool = False) -> ImageFolder:
    """An image-folder dataset with timm's eval (or train) transform at ``input_size``.

    ``class_to_idx`` labels the classes by name (a validation folder gets its training folder's
    labels, ``labels_from`` names that folder); a class folder it lacks is refused. ``skip_bad``
    decodes every image first and leaves out those that fail (``dataset.skipped``); otherwise a bad
    image is refused when it is read."""
    root = os.fspath(root)
    if split and os.path.isdir(os.path.join(root, split)):
        root = os.path.join(root, split)
    if not os.path.isdir(root):
        raise InputError(f"--data {root!r} is not a directory")
    mode = _image_mode(input_size)
    samples, found = find_images_and_targets(root)
    if not samples:
        raise InputError(f"no images found under {root} (expected DIR/<class>/<image files>)")
    if class_to_idx is not None:
        samples = _relabel(root, samples, found, class_to_idx, labels_from or "the training folder")
    skipped: list[str] = []
    if skip_bad:
        samples, skipped = _readable(samples, mode)
        if not samples:
            raise InputError(f"none of the {len(skipped)} images under {root} can be read (first: {skipped[0]})")
    # timm's eval transform resizes by 1/0.875 and centre-crops: right for 224-pixel photos, but on
    # small images (digits at 32 px) it cuts away the content, so those are only resized
    crop_pct = 1.0 if max(input_size[1:]) <= 64 else None
    mean, std = _NORMALIZE[int(input_size[0])]
    transform = create_transform(input_size=input_size, is_training=train, crop_pct=crop_pct, mean=mean, std=std)
    return ImageFolder(root, samples, dict(class_to_idx or found), mode, transform, skipped)


def _relabel(root: str, samples: list[tuple[str, int]], found: dict[str, int], class_to_idx: dict[str, int],
             labels_from: str) -> list[tuple[str, int]]:
    """``samples`` labelled by ``class_to_idx`` (by class name); a class it does not have is refused."""
    extra = sorted(set(found) - set(class_to_idx))
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise InputError(f"{root} has class folder(s) {shown} that {labels_from} does not have "
                         f"(it has {len(class_to_idx)}: {', '.join(list(class_to_idx)[:5])}"
                         f"{', ...' if len(class_to_idx) > 5 else ''}); labels are matched by folder name: "
                         f"rename or remove them")
    name_of = {i: c for c, i in found.items()}
    return [(path, class_to_idx[name_of[target]]) for path, target in samples]


def loader(root: str | os.PathLike, input_size: tuple[int, int, int], *, batch_size: int,
           split: str | None = None, train: bool = False, shuffle: bool = False, seed: int = 0,
           workers: int = 0, skip_bad: bool = False) -> DataLoader:
    dataset = image_folder(root, input_size, split=split, train=train, skip_bad=skip_bad)
    return loader_of(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed, workers=workers)


def loader_of(dataset: Dataset, *, batch_size: int, shuffle: bool = False, seed: int = 0,
              workers: int = 0) -> DataLoader:
    """A DataLoader over ``dataset`` whose shuffle order is fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=workers,
                      drop_last=False)


def calibration_batches(root: str | os.PathLike, input_size: tuple[int, int, int], *, batches: int,
                        batch_size: int, seed: int = 0,
                        skip_bad: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` shuffled (images, labels) batches from the train split (or the folder itself)."""
    dataset = image_folder(root, input_size, split="train", skip_bad=skip_bad)
    return first_batches(dataset, batches=batches, batch_size=batch_size, seed=seed)


def first_batches(dataset: Dataset, *, batches: int, batch_size: int,
                  seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` shuffled (images, labels) batches of ``dataset``, the order fixed by ``seed``."""
    for i, (images, labels) in enumerate(loader_of(dataset, batch_size=batch_size, shuffle=True, seed=seed)):
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
