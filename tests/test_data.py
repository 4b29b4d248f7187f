import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ctfgen.data.datasets import (DataError, FASHION_MNIST_ENV, ImageFolder, build_dataset, dataset_labels,
                                  load_fashion_mnist_arrays, npz_dataset)
from ctfgen.data.sampler import StepBatches, batch_indices
from ctfgen.data.transforms import ImageTransform, image_grid


def write_idx(path, array: np.ndarray, magic: int, gz: bool = True) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.fixture
def fmnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 2051)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)), 2049)
    return tmp_path


def test_fashion_mnist_reads_split_and_pads_to_32(fmnist_dir):
    images, labels = load_fashion_mnist_arrays(fmnist_dir, "test")
    assert images.shape == (5, 28, 28) and labels.shape == (5,)
    ds = build_dataset("fashion-mnist", "train", 32, 1, data_dir=fmnist_dir)
    x, y = ds[3]
    assert len(ds) == 12 and x.shape == (1, 32, 32) and 0 <= y < 10
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    # padding keeps every pixel: the centre equals the original image
    raw = torch.from_numpy(load_fashion_mnist_arrays(fmnist_dir, "train")[0][3].astype(np.float32)) / 127.5 - 1
    assert torch.allclose(x[0, 2:30, 2:30], raw)
    assert (x[0, :2] == -1).all()


def test_fashion_mnist_env_variable(fmnist_dir, monkeypatch):
    monkeypatch.setenv(FASHION_MNIST_ENV, str(fmnist_dir))
    assert len(build_dataset("fashion-mnist", "test")) == 5


def test_fashion_mnist_missing_names_install_command(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist_arrays(tmp_path, "train")


def test_fashion_mnist_bad_magic(fmnist_dir):
    write_idx(fmnist_dir / "train-images-idx3-ubyte.gz", np.zeros((12, 28, 28)), 1234)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*magic"):
        load_fashion_mnist_arrays(fmnist_dir, "train")


def test_fashion_mnist_truncated(fmnist_dir):
    path = fmnist_dir / "t10k-images-idx3-ubyte.gz"
    data = gzip.open(path).read()
    gzip.open(path, "wb").write(data[:-100])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        load_fashion_mnist_arrays(fmnist_dir, "test")


def test_fashion_mnist_corrupt_gzip(fmnist_dir):
    path = fmnist_dir / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_fashion_mnist_arrays(fmnist_dir, "test")


def test_fashion_mnist_label_count_mismatch(fmnist_dir):
    write_idx(fmnist_dir / "t10k-labels-idx1-ubyte.gz", np.zeros(4), 2049)
    with pytest.raises(DataError, match="5 test images but 4 labels"):
        load_fashion_mnist_arrays(fmnist_dir, "test")


def make_folder(root, n_per_class=3, size=(40, 30)):
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(np.full((*size[::-1], 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_folder_resize_center_crop_rgb_and_gray(tmp_path):
    root = make_folder(tmp_path / "imgs")
    ds = ImageFolder(root, ImageTransform(16, 3))
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and y == 1
    assert ImageFolder(root, ImageTransform(16, 1))[0][0].shape == (1, 16, 16)


def test_image_folder_unreadable_skip_and_raise(tmp_path):
    root = make_folder(tmp_path / "imgs")
    bad = root / "cat" / "0.png"
    bad.write_bytes(b"not an image")
    ds = ImageFolder(root, ImageTransform(16, 3))
    x, y = ds[0]  # served the next readable image instead
    assert x.shape == (3, 16, 16) and ds.skipped == {str(bad)}
    with pytest.raises(DataError, match=str(bad)):
        ImageFolder(root, ImageTransform(16, 3), on_error="raise")[0]


def test_image_folder_split_subfolder_and_empty(tmp_path):
    make_folder(tmp_path / "data" / "train")
    make_folder(tmp_path / "data" / "test", n_per_class=1)
    assert len(build_dataset(str(tmp_path / "data"), "test", 16, 3)) == 2
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "empty", ImageTransform(16))


def test_npz_dataset(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.random.default_rng(0).random((4, 20, 20, 3)), labels=np.array([0, 1, 2, 1]))
    ds = npz_dataset(path, ImageTransform(16, 3))
    assert len(ds) == 4 and ds[2][0].shape == (3, 16, 16) and ds[2][1] == 2
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="missing array"):
        npz_dataset(tmp_path / "bad.npz", ImageTransform(16))
    np.savez(tmp_path / "len.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.zeros(2))
    with pytest.raises(DataError, match="expected images"):
        npz_dataset(tmp_path / "len.npz", ImageTransform(16))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz is not a readable .npz \\(not a zip archive of arrays\\)"):
        npz_dataset(tmp_path / "junk.npz", ImageTransform(16))
    np.savez(tmp_path / "damaged.npz", images=np.arange(4096, dtype=np.uint8).reshape(16, 16, 16), labels=np.zeros(16))
    data = bytearray((tmp_path / "damaged.npz").read_bytes())
    data[200:300] = bytes(100)  # inside the first array's bytes: the archive opens, reading the array fails
    (tmp_path / "damaged.npz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="damaged.npz is not a readable .npz \\(BadZipFile"):
        npz_dataset(tmp_path / "damaged.npz", ImageTransform(16))


def test_unknown_dataset_spec():
    with pytest.raises(DataError, match="unknown dataset"):
        build_dataset("no-such-thing")


def test_hflip_mirrors_about_half_the_time():
    img = Image.fromarray(np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1)))
    plain = ImageTransform(16, 1)(img)
    torch.manual_seed(0)
    outs = [ImageTransform(16, 1, hflip=True)(img) for _ in range(200)]
    flipped = sum(torch.equal(o, plain.flip(-1)) for o in outs)
    assert all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outs)
    assert 60 < flipped < 140


def test_batch_indices_cover_epoch_and_are_deterministic():
    steps = [batch_indices(10, 3, seed=1, step=s) for s in range(3)]
    assert len(torch.cat(steps).unique()) == 9  # 3 batches of 3, last item of the epoch dropped
    assert torch.equal(batch_indices(10, 3, 1, 2), steps[2])
    assert not torch.equal(batch_indices(10, 3, 1, 3), steps[0])  # a new epoch reshuffles
    # two ranks split one global batch
    both = torch.cat([batch_indices(10, 2, 1, 0, rank=r, world_size=2) for r in range(2)])
    assert len(both.unique()) == 4
    assert list(StepBatches(10, 3, 1, 1, 3)) == [s.tolist() for s in steps[1:]]
    with pytest.raises(ValueError, match="smaller than the global batch"):
        batch_indices(2, 3, 0, 0)


def test_image_grid_shape():
    grid = image_grid(torch.zeros(10, 1, 8, 8), nrow=4, pad=1)
    assert grid.size == (4 * 9 + 1, 3 * 9 + 1) and grid.mode == "L"


# --- class-balanced subsets and the hold-out of a set without a test split ----------------------

def test_balanced_subset_is_even_seeded_and_fills_from_larger_classes():
    from ctfgen.data.datasets import balanced_subset

    labels = np.array([0] * 50 + [1] * 30 + [2] * 4)
    picked = balanced_subset(labels, 30, seed=1)
    assert len(set(picked)) == 30 and list(picked) == sorted(picked)
    assert np.bincount(labels[picked]).tolist() == [13, 13, 4]  # class 2 has only 4: the rest is shared
    assert np.array_equal(picked, balanced_subset(labels, 30, seed=1))
    assert not np.array_equal(picked, balanced_subset(labels, 30, seed=2))
    assert np.bincount(labels[balanced_subset(labels, 9)]).tolist() == [3, 3, 3]
    assert len(balanced_subset(labels, len(labels))) == len(labels)


def test_a_set_without_a_test_split_holds_out_a_recorded_balanced_tenth(tmp_path):
    from ctfgen.data.datasets import build_dataset, dataset_labels

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (200, 8, 8)).astype(np.uint8), labels=labels)
    train = build_dataset(str(tmp_path / "d.npz"), "train", resolution=8)
    test = build_dataset(str(tmp_path / "d.npz"), "test", resolution=8)
    assert (len(train), len(test)) == (180, 20)
    assert np.bincount(dataset_labels(test)).tolist() == [5, 5, 5, 5]
    assert not set(train.indices) & set(test.indices)
    assert test.holdout == {"held_out": 20, "of": 200, "seed": 0, "class_balanced": True}
    np.savez(tmp_path / "d_test.npz", images=np.zeros((3, 8, 8), np.uint8), labels=np.zeros(3))
    assert len(build_dataset(str(tmp_path / "d.npz"), "test", resolution=8)) == 3  # a real test split wins
    np.savez(tmp_path / "one.npz", images=np.zeros((1, 8, 8), np.uint8), labels=np.zeros(1))
    with pytest.raises(DataError, match="one.npz: 1 item.* no test split: too few"):  # not an empty training set
        build_dataset(str(tmp_path / "one.npz"), "train", resolution=8)


def test_photos_are_centre_cropped_as_adm_does_and_never_padded():
    from ctfgen.data.transforms import center_crop

    wide = Image.fromarray(np.tile(np.linspace(0, 255, 512).astype(np.uint8), (384, 1)))
    assert center_crop(wide, 128).size == (128, 128)
    halved = wide.resize((256, 192), Image.BOX)  # one box halving, then bicubic from there
    expected = halved.resize((171, 128), Image.BICUBIC).crop((21, 0, 149, 128))
    assert np.array_equal(np.asarray(center_crop(wide, 128)), np.asarray(expected))
    small = Image.new("L", (20, 12), 255)
    assert torch.all(ImageTransform(32, 1)(small) == 1)  # scaled up, no black border
    padded = ImageTransform(32, 1, pad_small=True)(small)  # Fashion-MNIST's rule: every pixel kept
    assert padded[0, 0, 0] == -1 and padded[0, 16, 16] == 1
    fm_item = Image.new("L", (28, 28), 255)
    assert ImageTransform(32, 1, pad_small=True)(fm_item)[0, 1, 1] == -1  # a 2 px black frame: 28 -> 32


def test_image_folder_lists_nested_files_into_one_shared_array(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "dog" / "deeper").mkdir()
    Image.new("RGB", (8, 8)).save(root / "dog" / "deeper" / "z.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    ds = ImageFolder(root, ImageTransform(16, 3))
    # a numpy bytes array, not a list of Python objects: forked DataLoader workers share its pages
    assert isinstance(ds.paths, np.ndarray) and ds.paths.dtype.kind == "S"
    names = [os.fsdecode(p) for p in ds.paths]
    assert names == sorted(names[:ds.labels.tolist().count(0)]) + sorted(names[ds.labels.tolist().count(0):])
    assert str(root / "dog" / "deeper" / "z.png") in names and not any(n.endswith(".txt") for n in names)
    assert np.array_equal(dataset_labels(ds), ds.labels)
