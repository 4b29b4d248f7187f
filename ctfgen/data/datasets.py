"""Image datasets: Fashion-MNIST (Debian idx files), an image folder (ImageNet layout), an .npz.

All three yield `(image float[C,H,W] in [-1,1], label int)` through the same
`ImageTransform`, so every later stage sees one format.
"""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..artifacts import read_npz
from ..errors import CtfgenError
from .transforms import ImageTransform

log = logging.getLogger(__name__)

FASHION_MNIST_ENV = "CTFGEN_FASHION_MNIST"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class DataError(CtfgenError):
    """A dataset file is missing, truncated or malformed."""


# --- Fashion-MNIST -------------------------------------------------------------------------

def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read an idx file (optionally gzipped), checking its magic number and length."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip raises these on a damaged or truncated archive
        raise DataError(f"{path}: cannot be read ({e}); reinstall with: {FASHION_MNIST_INSTALL}") from None
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], "big") != magic:
        raise DataError(f"{path}: bad magic number (expected {magic}); the file is corrupt or not an idx file")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path}: {len(data)} bytes, expected {expected} for shape {shape}; the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with: {FASHION_MNIST_INSTALL} "
                    f"(or point ${FASHION_MNIST_ENV} / --data-dir at a folder holding the idx files)")


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def load_fashion_mnist_arrays(root: str | Path | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N,28,28] and labels [N] of the 60k/10k split."""
    if split not in ("train", "test"):
        raise CtfgenError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = fashion_mnist_root(root)
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"), 2051, 3)
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"), 2049, 1)
    if len(images) != len(labels):
        raise DataError(f"{root}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{root}: label {labels.max()} out of range for Fashion-MNIST's 10 classes")
    return images, labels


class ArrayDataset(Dataset):
    """Images held in memory as uint8 [N,H,W] or [N,H,W,C] arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: ImageTransform, classes: list[str] | None = None):
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform
        self.classes = list(classes) if classes else [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def fashion_mnist(split: str, transform: ImageTransform, root: str | Path | None = None) -> ArrayDataset:
    images, labels = load_fashion_mnist_arrays(root, split)
    return ArrayDataset(images, labels, transform, list(FASHION_MNIST_CLASSES))


# --- .npz ------------------------------------------------------------------------------------

def npz_dataset(path: str | Path, transform: ImageTransform) -> ArrayDataset:
    """An .npz with `images` (uint8 [N,H,W] or [N,H,W,C], or floats in [0,1]) and `labels` [N]."""
    with read_npz(path, error=DataError) as f:
        missing = {"images", "labels"} - set(f.files)
        if missing:
            raise DataError(f"{path}: missing array(s) {sorted(missing)} (has {f.files})")
        images, labels = f["images"], f["labels"]
    if images.ndim not in (3, 4) or len(images) != len(labels) or labels.ndim != 1:
        raise DataError(f"{path}: expected images [N,H,W(,C)] and labels [N], got {images.shape} and {labels.shape}")
    if images.dtype != np.uint8:
        if images.size and (images.min() < 0 or images.max() > 1):
            raise DataError(f"{path}: float images must lie in [0,1] (or store uint8)")
        images = (images * 255).round().astype(np.uint8)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if labels.size and labels.min() < 0:
        raise DataError(f"{path}: negative labels")
    return ArrayDataset(images, labels, transform)


# --- image folder ------------------------------------------------------------------------------

def _image_files(folder: str) -> Iterator[str]:
    """Image files under `folder`, recursively (os.scandir: a million files list in seconds)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                yield from _image_files(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                yield entry.path


class ImageFolder(Dataset):
    """One sub-folder per class. `on_error='skip'` (default) logs and counts an unreadable file and
    serves the next readable one instead; `on_error='raise'` stops with the file's path."""

    def __init__(self, root: str | Path, transform: ImageTransform, on_error: str = "skip"):
        root = Path(root)
        if on_error not in ("skip", "raise"):
            raise CtfgenError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
        if not root.is_dir():
            raise DataError(f"image folder {root} not found")
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        paths, labels = [], []
        for label, c in enumerate(self.classes):
            found = sorted(_image_files(os.path.join(root, c)))
            paths += found
            labels += [label] * len(found)
        if not paths:
            raise DataError(f"{root}: no images found (expected one sub-folder per class holding image files)")
        # one bytes array, not a list of objects: DataLoader workers share it without copying (no refcounts)
        self.paths = np.array([os.fsencode(p) for p in paths])
        self.labels = np.array(labels, dtype=np.int64)
        self.root, self.transform, self.on_error = root, transform, on_error
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for j in range(len(self.paths)):
            k = (i + j) % len(self.paths)
            path = os.fsdecode(self.paths[k])
            try:
                with Image.open(path) as img:
                    return self.transform(img), int(self.labels[k])
            except Exception as e:  # PIL raises many types on a bad file
                if self.on_error == "raise":
                    raise DataError(f"unreadable image {path}: {e}") from None
                if path not in self.skipped:
                    self.skipped.add(path)
                    log.warning("skipping unreadable image %s (%s); %d skipped so far", path, e, len(self.skipped))
        raise DataError(f"{self.root}: no readable image at all")


# --- subsets: class-balanced draws and the hold-out of a set without a test split -------------

def dataset_labels(dataset: Dataset) -> np.ndarray:
    """The class label of every item, without loading any image."""
    if isinstance(dataset, (ArrayDataset, Subset, ImageFolder)):
        return dataset.labels
    return np.array([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def balanced_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `n` items drawn at random (seeded), as evenly over the classes as their sizes allow."""
    labels = np.asarray(labels)
    if not 0 <= n <= len(labels):
        raise CtfgenError(f"cannot draw {n} of {len(labels)} items")
    rng = np.random.default_rng(seed)
    classes, sizes = np.unique(labels, return_counts=True)
    quota = np.zeros(len(classes), dtype=np.int64)
    left = n
    while left:  # water-filling: equal shares, a small class gives its unused share to the others
        open_ = np.flatnonzero(quota < sizes)
        share, extra = divmod(left, len(open_))
        add = np.full(len(open_), share)
        add[rng.permutation(len(open_))[:extra]] += 1
        add = np.minimum(add, sizes[open_] - quota[open_])
        quota[open_] += add
        left -= int(add.sum())
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


class Subset(Dataset):
    """Some items of a dataset, keeping its class names and labels."""

    def __init__(self, base: Dataset, indices: np.ndarray, note: dict | None = None):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.labels = dataset_labels(base)[self.indices]
        self.classes = getattr(base, "classes", None)
        self.holdout = note  # how a hold-out was taken, for the artifacts to record

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.base[int(self.indices[i])]


HOLDOUT_FRACTION, HOLDOUT_CAP, HOLDOUT_SEED = 0.1, 10000, 0


def holdout_split(dataset: Dataset, split: str, name: str = "the set") -> Subset:
    """A set without a test part: 'test' is a seeded class-balanced 10% (at most 10,000 items), 'train' the rest."""
    labels = dataset_labels(dataset)
    if len(labels) < 2:
        raise DataError(f"{name}: {len(labels)} item(s) and no test split: too few to hold test items out of")
    n = min(HOLDOUT_CAP, max(1, round(HOLDOUT_FRACTION * len(labels))))
    test = balanced_subset(labels, n, HOLDOUT_SEED)
    note = {"held_out": int(n), "of": int(len(labels)), "seed": HOLDOUT_SEED, "class_balanced": True}
    if split == "test":
        return Subset(dataset, test, note)
    if split == "train":
        return Subset(dataset, np.setdiff1d(np.arange(len(labels)), test), note)
    raise DataError(f"split must be 'train' or 'test' for a set without split parts, got {split!r}")


# --- one entry point ----------------------------------------------------------------------------

def build_dataset(spec: str, split: str = "train", resolution: int = 32, channels: int = 1, hflip: bool = False,
                  data_dir: str | Path | None = None, on_error: str = "skip", views: str = "none") -> Dataset:
    """`spec` is 'fashion-mnist', a path to an .npz, or an image folder (with optional split sub-folders).

    For an .npz, `<stem>_<split>.npz` is used when it exists (e.g. data_test.npz beside data.npz); for a
    folder, its `<split>/` sub-folder. Without them the one set is split by `holdout_split` (recorded in
    the dataset's `holdout` attribute), so the test images are never trained on. `views` (extraction):
    items are float[views, C, H, W] (see `ImageTransform`).
    """
    transform = ImageTransform(resolution, channels, hflip, views=views)
    if spec == "fashion-mnist":  # 28 px items padded to 32, every pixel kept
        return fashion_mnist(split, ImageTransform(resolution, channels, hflip, pad_small=True, views=views), data_dir)
    path = Path(spec)
    if path.suffix == ".npz":
        split_path = path.with_name(f"{path.stem}_{split}.npz")
        if split_path.is_file():
            return npz_dataset(split_path, transform)
        return holdout_split(npz_dataset(path, transform), split, spec)
    if path.is_dir():
        if (path / split).is_dir():
            return ImageFolder(path / split, transform, on_error)
        return holdout_split(ImageFolder(path, transform, on_error), split, spec)
    raise DataError(f"unknown dataset {spec!r}: use 'fashion-mnist', an .npz file or an image folder")


def check_data(spec: str, data_dir: str | Path | None = None) -> None:
    """Fail now, before a command creates anything, if `spec` cannot be read as a dataset."""
    build_dataset(spec, "train", data_dir=data_dir)


def take_images(dataset: Dataset, n: int | None = None) -> torch.Tensor:
    """The first `n` images of a dataset (all if None) stacked into one float[N,C,H,W] tensor."""
    n = len(dataset) if n is None else min(n, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)])
