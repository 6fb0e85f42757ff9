import gzip
import re
from pathlib import Path

import numpy as np
import pytest

import main
import utils

REAL_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
COMMITTED_CLASSIFIER = Path(__file__).resolve().parents[1] / "checkpoints" / "classifier-mnist.pt"
FAST_SCORES = ["--quality-samples", "500", "--nll-samples", "10"]  # the defaults take seconds a call on a CPU


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


def run_expecting_error(argv, capsys):
    """Run main(argv), which must fail; return its exit code and the one line it printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main.main([str(word) for word in argv])
    stderr = capsys.readouterr().err
    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)  # what a terminal shows: bars move the cursor
    lines = [line.strip() for line in re.split(r"[\r\n]+", shown) if line.strip()]  # and overwrite lines with \r
    printed = lines[-1]
    assert printed.startswith("error: ") and "Traceback" not in stderr, stderr
    assert sum(line.startswith("error") for line in lines) == 1, stderr
    return exited.value.code, printed
