"""Digit mosaics: a harder task built from scikit-learn's digits, for benchmarks that must separate methods.

On plain digits a small ViT scores ~97% on a 360-image test split (one image = 0.28 points), so
pruning methods land inside each other's seed noise. A mosaic puts four digits in a 2×2 grid and its
label needs all four and where each one sits: the position-weighted sum

    s = 1·d_tl + 2·d_tr + 3·d_bl + 4·d_br          (0 … 90)

cut into 10 classes at the deciles of ``s`` over all 10⁴ digit combinations (:data:`EDGES`). Every
digit moves ``s``, each by its quadrant's weight, so misreading one digit (most of all bottom-right,
weight 4, where the middle classes are 4–5 wide) usually changes the class: a model that reads single
digits at ~97% lands well below saturation on mosaics, and capacity lost to pruning shows.

(A modular rule such as ``s mod 10`` was tried first: no digit or set of three digits carries any
information about the label, and a small ViT stayed at chance, 9.6%, after its first epoch while
this rule was at 27.6%; the ordinal rule is learnable by gradient descent in a CPU budget.)

Design (all fixed by ``seed``):

- the 1,797 digit images are split stratified into a train pool and a test pool
  (``digit_test_fraction``); train mosaics use only train-pool digits and test mosaics only test-pool
  digits, so every test digit image is unseen;
- labels are exactly balanced: mosaic ``i`` gets class ``i mod 10`` (then shuffled) and a digit
  combination drawn uniformly from the combinations in that class; each quadrant then gets a random
  pool image of its digit;
- each digit is upsampled bilinearly to ``image_size / 2`` and the four tiles are joined, then
  repeated to 3 channels and normalised with timm's ImageNet mean/std, as in
  :mod:`vitprune.train.digits`.

**Scattered mosaics** (``grid=8``, ``background=0.15``: the Pareto benchmark's task). The image is
a ``grid × grid`` array of cells and each quadrant's digit sits in one of its ``(grid/2)²`` cells,
drawn uniformly; every other cell shows only uniform noise in ``[0, background]``. At 64×64 with
8×8 cells each digit keeps scikit-learn's own 8×8 resolution and a patch-8 ViT sees 64 patch tokens,
one per cell: it must find the four digit tokens among 60 noise tokens (where they are changes from
image to image) and read each with its quadrant's weight, so attention carries the task, as it does
on real images, and costs a DeiT-like share of the FLOPs. The label rule is the same.

Mosaics are composed on access from the 1,797 tiles and an index table, so any size costs little
memory::

    train_ds, test_ds = mosaic_splits(image_size=32)         # 20,000 train, 2,000 test mosaics
    train_ds[0]                                              # (image [3, 32, 32] float32, label int64)
    train_ds.digits[0], train_ds.sources[0]                  # the four digit classes / sklearn indices
    scattered, _ = mosaic_splits(64, grid=8, background=0.15)  # 64 cells of 8×8: 64 patch tokens at patch 8
    scattered.cells[0]                                       # each digit's cell within its quadrant
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from vitprune.errors import InputError
from vitprune.train.digits import load_digit_images, normalise, split_indices

NUM_CLASSES = 10
WEIGHTS = (1, 2, 3, 4)  # top-left, top-right, bottom-left, bottom-right
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
# class c holds the weighted sums s with EDGES[c-1] <= s < EDGES[c]: the deciles of s over all 10⁴
# combinations (np.quantile); each class holds 922–1,114 of the combinations
EDGES = (24, 31, 36, 41, 45, 49, 54, 59, 66)
_ALL = np.stack(np.meshgrid(*[np.arange(10)] * 4, indexing="ij"), -1).reshape(-1, 4)  # every combination


def mosaic_label(digits: Any) -> np.ndarray:
    """``[N, 4]`` digit classes (top-left, top-right, bottom-left, bottom-right) → ``[N]`` labels."""
    d = np.asarray(digits, dtype=np.int64)
    if d.ndim != 2 or d.shape[1] != 4 or (d.size and (d.min() < 0 or d.max() > 9)):
        raise InputError(f"mosaic_label needs an [N, 4] array of digits 0-9, got shape {d.shape}")
    return np.searchsorted(np.asarray(EDGES), d @ np.asarray(WEIGHTS, dtype=np.int64), side="right")


class MosaicDataset(Dataset):
    """Mosaics of four digit tiles; ``(image [3, S, S] float32 normalised, label int64)`` per item.

    ``sources`` (``[N, 4]`` indices into scikit-learn's digits), ``digits`` (their classes),
    ``cells`` (``[N, 4]``: where in its quadrant each digit sits, row-major; all 0 on a 2×2 grid) and
    ``labels`` are plain tensors, so a test or a report can check what each mosaic is made of.
    ``background`` (``[K, S, S]``, or None: black) are the noise fields mosaic ``i`` is drawn on
    (``background_ids[i]``); a digit is laid over its cell's noise by a pixel-wise maximum.
    """

    def __init__(self, tiles: torch.Tensor, sources: np.ndarray, digits: np.ndarray, *, grid: int = 2,
                 cells: np.ndarray | None = None, background: torch.Tensor | None = None,
                 background_ids: np.ndarray | None = None) -> None:
        self.tiles = tiles  # [1797, S/grid, S/grid] in [0, 1]
        self.grid = grid
        self.sources = torch.from_numpy(np.ascontiguousarray(sources, dtype=np.int64))
        self.digits = torch.from_numpy(np.ascontiguousarray(digits, dtype=np.int64))
        self.labels = torch.from_numpy(mosaic_label(digits))
        self.cells = torch.zeros_like(self.sources) if cells is None else torch.from_numpy(cells.astype(np.int64))
        self.background = background
        self.background_ids = None if background_ids is None else torch.from_numpy(background_ids.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: int | slice | torch.Tensor) -> torch.Tensor:
        """Grayscale mosaics in [0, 1] before normalisation: ``[S, S]`` (or ``[n, S, S]``)."""
        single = isinstance(index, int)
        index = torch.arange(len(self))[index] if not isinstance(index, torch.Tensor) else index
        index = index.reshape(-1)
        n, t, g = len(index), self.tiles.shape[-1], self.grid
        if self.background is None:
            canvas = torch.zeros(n, g, g, t, t)
        else:  # [n, S, S] -> cells [n, g, g, t, t]
            canvas = self.background[self.background_ids[index]].reshape(n, g, t, g, t).permute(0, 1, 3, 2, 4).clone()
        half, rows = g // 2, torch.arange(n)
        for q in range(4):
            cell = self.cells[index, q]
            r, c = (q // 2) * half + cell // half, (q % 2) * half + cell % half
            canvas[rows, r, c] = torch.maximum(canvas[rows, r, c], self.tiles[self.sources[index, q]])
        out = canvas.permute(0, 1, 3, 2, 4).reshape(n, g * t, g * t)
        return out[0] if single else out

    def images(self, index: torch.Tensor) -> torch.Tensor:
        """The normalised 3-channel mosaics ``[n, 3, S, S]`` of the indices ``index``."""
        return normalise(self.pixels(index).unsqueeze(1).expand(-1, 3, -1, -1))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images(torch.tensor([index]))[0], self.labels[index]

    def materialize(self) -> TensorDataset:
        """Every mosaic composed once (``[N, 3, S, S]``, 12·S² bytes each: 245 MB for 20,000 at 32×32):
        a training loop then only indexes, ~2.5× faster than composing each item on access."""
        chunks = [self.images(torch.arange(i, min(i + 2048, len(self)))) for i in range(0, len(self), 2048)]
        return TensorDataset(torch.cat(chunks).contiguous(), self.labels.clone())


def _validate(image_size: Any, train_size: Any, test_size: Any, seed: Any, digit_test_fraction: Any, grid: Any,
              background: Any) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not (is_int(grid) and grid >= 2 and grid % 2 == 0):
        raise InputError(f"grid must be an even integer >= 2 (cells per side, a quadrant per digit), got {grid!r}")
    if not (is_int(image_size) and image_size >= 8 * grid and image_size % grid == 0):
        raise InputError(f"image_size must be a multiple of grid ({grid}) and at least {8 * grid} "
                         f"(cells of at least 8×8 pixels, the digits' own size), got {image_size!r}")
    for name, v in (("train_size", train_size), ("test_size", test_size)):
        if not (is_int(v) and v >= NUM_CLASSES):
            raise InputError(f"{name} must be an integer >= {NUM_CLASSES} (one mosaic per class), got {v!r}")
    if not is_int(seed):
        raise InputError(f"seed must be an integer, got {seed!r}")
    if not (isinstance(digit_test_fraction, (int, float)) and not isinstance(digit_test_fraction, bool)
            and 0.0 < digit_test_fraction < 1.0):
        raise InputError(f"digit_test_fraction must be in (0, 1), got {digit_test_fraction!r}")
    if not (isinstance(background, (int, float)) and not isinstance(background, bool) and 0.0 <= background < 1.0):
        raise InputError(f"background must be the noise amplitude in [0, 1), got {background!r}")


def _sample(pool: np.ndarray, classes: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` mosaics from the digit images ``pool``: (sources [n, 4], digits [n, 4]), labels balanced."""
    labels = rng.permutation(np.arange(n) % NUM_CLASSES)
    all_labels = mosaic_label(_ALL)
    digits = np.empty((n, 4), dtype=np.int64)
    for c in range(NUM_CLASSES):  # a uniform draw among the combinations of class c
        combos, where = _ALL[all_labels == c], labels == c
        digits[where] = combos[rng.integers(0, len(combos), size=int(where.sum()))]
    by_class = [pool[classes[pool] == c] for c in range(NUM_CLASSES)]
    sources = np.empty_like(digits)
    for c in range(NUM_CLASSES):
        where = digits == c
        sources[where] = rng.choice(by_class[c], size=int(where.sum()))
    return sources, digits


def _tiles(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(images).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x[:, 0].clamp_(0.0, 1.0).contiguous()


#: Background noise fields per mosaic task (each mosaic draws one).
NOISE_FIELDS = 1024


def _dataset(tiles: torch.Tensor, pool: np.ndarray, classes: np.ndarray, n: int, rng: np.random.Generator,
             grid: int, bank: torch.Tensor | None) -> MosaicDataset:
    sources, digits = _sample(pool, classes, n, rng)
    cells = rng.integers(0, (grid // 2) ** 2, size=(n, 4)) if grid > 2 else None
    ids = rng.integers(0, len(bank), size=n) if bank is not None else None
    return MosaicDataset(tiles, sources, digits, grid=grid, cells=cells, background=bank, background_ids=ids)


def mosaic_splits(image_size: int = 32, *, train_size: int = 20_000, test_size: int = 2_000, seed: int = 0,
                  digit_test_fraction: float = 0.3, grid: int = 2,
                  background: float = 0.0) -> tuple[MosaicDataset, MosaicDataset]:
    """``(train_ds, test_ds)``: mosaics from disjoint digit pools (see the module docstring).

    ``grid`` cells per side (even): each quadrant is ``grid/2 × grid/2`` cells and its digit sits in
    one of them, drawn uniformly; the others show only the background, uniform noise in
    ``[0, background]`` (one of :data:`NOISE_FIELDS` fields per mosaic). ``grid=2`` is the plain
    2×2 mosaic."""
    _validate(image_size, train_size, test_size, seed, digit_test_fraction, grid, background)
    images, classes = load_digit_images()
    train_pool, test_pool = split_indices(classes, seed, digit_test_fraction)
    rng = np.random.default_rng(seed)
    tiles = _tiles(images, image_size // grid)
    bank = None
    if background > 0:
        g = torch.Generator().manual_seed(seed)
        bank = background * torch.rand(NOISE_FIELDS, image_size, image_size, generator=g)
    train = _dataset(tiles, train_pool, classes, train_size, rng, grid, bank)
    test = _dataset(tiles, test_pool, classes, test_size, rng, grid, bank)
    return train, test


def mosaic_loaders(batch_size: int, image_size: int = 32, *, train_size: int = 20_000, test_size: int = 2_000,
                   seed: int = 0, workers: int = 0) -> tuple[DataLoader, DataLoader]:
    """``(train_loader, test_loader)``: the train loader shuffles (seeded), the test loader does not."""
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    train_ds, test_ds = mosaic_splits(image_size, train_size=train_size, test_size=test_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train_ds, batch_size=batch_size, shuffle=True, generator=g, num_workers=workers),
            DataLoader(test_ds, batch_size=batch_size, shuffle=False, num_workers=workers))
