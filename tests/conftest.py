import gzip
from pathlib import Path

import numpy as np
import pytest

import utils

REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def write_idx(path, array, *, compress):
    """Write a uint8 array as an IDX file: magic (0x0000 08 ndim), sizes as big-endian uint32, then bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if compress else data)


def make_synthetic_mnist(folder, *, n_train=256, n_test=64, compress=True, seed=0):
    """Four IDX files of random 28x28 'digits': a bright bar whose position depends on the label."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n)
        images = rng.integers(0, 40, size=(n, 28, 28))
        for image, label in zip(images, labels):
            image[4:24, 2 + 2 * label: 5 + 2 * label] = 255
        images_name, labels_name = utils.MNIST_FILES[split]
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{images_name}{suffix}", images, compress=compress)
        write_idx(folder / f"{labels_name}{suffix}", labels, compress=compress)
    return folder


@pytest.fixture
def synthetic_mnist(tmp_path):
    return make_synthetic_mnist(tmp_path / "mnist")
