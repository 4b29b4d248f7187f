"""A second real dataset for the bench, from the photos scikit-image and scikit-learn ship (no download).

Each class is one photo; an item is a square crop of it at a random place and scale, resized to 32 px
(RGB; ctfgen's small tokenizer reads it as grey). Test crops are drawn the same way with their own random
stream: the same distribution as the training crops (a test crop may overlap training ones, as ImageNet's
FID reference, its training set, is the distribution the model learns).

    python benchmarks/photo_patches.py --out /work/data/photos        # photos_train.npz + photos_test.npz
    ctfgen bench --grid stage2 --data /work/data/photos/photos.npz --out runs/photos
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from ctfgen.arguments import Between, Count, arg_type, checked

SIZES = Between(8, 64)  # output pixels: the largest crops of the smallest photo are 75 px a side


def photos() -> dict[str, np.ndarray]:
    """The colour photos both packages ship, uint8 [H, W, 3]."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    shipped = {name: getattr(skimage.data, name)() for name in (
        "astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")}
    sklearn = load_sample_images()
    shipped.update({Path(f).stem: im for f, im in zip(sklearn.filenames, sklearn.images)})  # china, flower
    return {name: im[..., :3] for name, im in sorted(shipped.items())}


def crops(photo: np.ndarray, n: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """n square crops resized to size px, each side between a tenth and a quarter of the photo's shorter side."""
    h, w = photo.shape[:2]
    lo, hi = max(size, min(h, w) // 10), min(h, w) // 4
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        s = int(rng.integers(lo, hi + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out[i] = np.asarray(Image.fromarray(photo[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True,
                        help="folder for photos_train.npz and photos_test.npz (the bench's --data FOLDER/photos.npz)")
    parser.add_argument("--train-per-class", type=arg_type(Count), default=4000)
    parser.add_argument("--test-per-class", type=arg_type(Count), default=500)
    parser.add_argument("--size", type=checked(int, SIZES), default=32, help="pixels, 8 to 64")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    named = photos()
    for stream, (split, n) in enumerate((("_train", args.train_per_class), ("_test", args.test_per_class))):
        rng = np.random.default_rng([args.seed, stream])
        images = np.concatenate([crops(p, n, rng, args.size) for p in named.values()])
        labels = np.repeat(np.arange(len(named)), n)
        np.savez(out / f"photos{split}.npz", images=images, labels=labels)
        print(f"{out / f'photos{split}.npz'}: {len(labels)} images, classes {', '.join(named)}")


if __name__ == "__main__":
    main()
