import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import main
import utils

ROOT = Path(__file__).resolve().parents[1]
REAL_MNIST = ROOT / "data"  # the committed MNIST, in torchvision's MNIST/raw layout
COMMITTED_CLASSIFIER = ROOT / "checkpoints" / "classifier-mnist.pt"
FAST_SCORES = ["--quality-samples", "500", "--nll-samples", "10"]  # the defaults take seconds a call on a CPU


@pytest.fixture(autouse=True)
def in_a_fresh_folder(tmp_path, monkeypatch):
    """Every test runs in its own folder, so that the scoring classifier's cache (checkpoints/, relative to the
    working folder) and every default path land there, never in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def committed_classifier(tmp_path):
    """The committed MNIST classifier in this test's cache folder: training it takes 20 s."""
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    shutil.copy(COMMITTED_CLASSIFIER, tmp_path / "checkpoints" / COMMITTED_CLASSIFIER.name)


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


def last_line(stderr):
    """What a terminal shows last: progress bars move the cursor and overwrite lines with \\r."""
    shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr)
    lines = [line.strip() for line in re.split(r"[\r\n]+", shown) if line.strip()]
    return lines[-1], lines


def check_error_line(stderr):
    """The run ended with exactly one line 'error: ...', no traceback, short once the paths it names are left out."""
    printed, lines = last_line(stderr)
    assert printed.startswith("error: ") and "Traceback" not in stderr, stderr
    assert sum(line.startswith("error") for line in lines) == 1, stderr
    assert len(re.sub(r"\S*/\S*|python main\.py .*", "", printed)) <= 200, printed  # the paths and the command
    return printed


def run_expecting_error(argv, capsys):
    """Run main(argv), which must fail; return its exit code and the one line it printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main.main([str(word) for word in argv])
    return exited.value.code, check_error_line(capsys.readouterr().err)
