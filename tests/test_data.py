import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import utils
from conftest import make_synthetic_mnist, run_expecting_error, write_idx


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips(tmp_path, compress):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    write_idx(tmp_path / "images", images, compress=compress)
    write_idx(tmp_path / "labels", [7, 0, 9], compress=compress)
    assert np.array_equal(utils.read_idx(tmp_path / "images", "images"), images)
    assert utils.read_idx(tmp_path / "labels", "labels").tolist() == [7, 0, 9]


def test_load_mnist_reads_torchvision_raw_layout_uncompressed(tmp_path):
    make_synthetic_mnist(tmp_path / "MNIST" / "raw", n_train=20, n_test=10, compress=False)
    data = utils.load_dataset(tmp_path)
    images, labels = data["train"]
    assert images.shape == (20, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (20,) and labels.dtype == torch.int64
    assert data["test"][0].shape == (10, 28, 28)


def test_to_model_input_scales_to_unit_interval():
    images = torch.tensor([[[0, 255] * 392]], dtype=torch.uint8).reshape(1, 28, 28)
    x = utils.to_model_input(images, torch.device("cpu"))
    assert x.shape == (1, 784) and x.dtype == torch.float32
    assert x.min().item() == 0.0 and x.max().item() == 1.0


def corrupt_truncated_gzip(path):
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])


def corrupt_magic(path):
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[3] = 1  # an images file claiming to be 1-D
    path.write_bytes(gzip.compress(bytes(raw)))


def corrupt_payload_size(path):
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))


@pytest.mark.parametrize("corrupt, words", [
    (corrupt_truncated_gzip, "cannot read"),
    (corrupt_magic, "not an MNIST images file"),
    (corrupt_payload_size, "truncated or padded"),
])
def test_a_corrupt_idx_file_gives_a_one_line_error_naming_it(synthetic_mnist, corrupt, words):
    bad_file = synthetic_mnist / "train-images-idx3-ubyte.gz"
    corrupt(bad_file)
    with pytest.raises(utils.ProjectError) as raised:
        utils.load_dataset(synthetic_mnist)
    message = str(raised.value)
    assert words in message and str(bad_file) in message and "\n" not in message


def test_images_and_labels_of_different_counts(tmp_path):
    folder = make_synthetic_mnist(tmp_path, n_test=12)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", [1, 2, 3], compress=True)
    with pytest.raises(utils.ProjectError, match="holds 12 images but .* holds 3 labels"):
        utils.load_dataset(folder)


def test_a_missing_file_is_named(synthetic_mnist):
    (synthetic_mnist / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(utils.ProjectError, match="lacks t10k-labels-idx1-ubyte"):
        utils.load_dataset(synthetic_mnist)


def test_failed_download_says_how_to_work_offline(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(utils.ProjectError, match="could not download MNIST .*Error downloading.*--data-dir"):
        utils.load_dataset(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # no empty folders left behind


def test_main_prints_the_error_without_a_traceback(synthetic_mnist, tmp_path, capsys):
    corrupt_truncated_gzip(synthetic_mnist / "train-labels-idx1-ubyte.gz")
    code, printed = run_expecting_error(["--data-dir", synthetic_mnist, "--epochs", "1", "--checkpoint-dir",
                                         tmp_path / "ck", "--figure-dir", tmp_path / "fig"], capsys)
    assert code == 1 and "train-labels-idx1-ubyte.gz" in printed
    assert not (tmp_path / "ck").exists()  # nothing trained, nothing written


def test_fashion_mnist_downloads_with_its_own_torchvision_class(tmp_path, monkeypatch):
    import torchvision.datasets

    asked = []

    def fake_download(root, train, download):
        asked.append(train)
        make_synthetic_mnist(Path(root) / "FashionMNIST" / "raw")  # where torchvision puts it

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    monkeypatch.setattr(torchvision.datasets, "MNIST", lambda **kwargs: pytest.fail("downloaded MNIST"))
    data = utils.load_dataset(tmp_path / "data", "fashion-mnist")
    assert asked == [True, False] and data["train"][0].shape == (256, 28, 28)
    assert len(list((tmp_path / "data" / "FashionMNIST" / "raw").glob("*.gz"))) == 4  # moved where it is looked for
    assert utils.DATASETS["fashion-mnist"].classes[9] == "Ankle boot"


def test_a_failed_download_always_says_why_and_that_the_folder_had_no_idx_files(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):  # torchvision's own message: a header line, then each mirror's error
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://a/, got:\n"
                           "<urlopen error [Errno -2] Name or service not known>\n")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(utils.ProjectError) as failed:
        utils.load_dataset(tmp_path / "figures")
    message = str(failed.value)
    assert "holds none of the four MNIST IDX files" in message
    assert "Error downloading train-images-idx3-ubyte.gz: <urlopen error [Errno -2]" in message
