"""Data, checkpoints, metrics and figures. Nothing here runs at import time."""
import gzip
import json
import math
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid

IMAGE_SIDE = 28
MNIST_FILES = {  # split -> (images file, labels file), as the official site names them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes, 3 dims / 1 dim


class ProjectError(Exception):
    """A problem the user can fix; main() prints it as one line, without a traceback, and exits with exit_code."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- data

def read_idx(path, kind):
    """Read one IDX file (gzipped or not) into a uint8 array: images (N, 28, 28) or labels (N,)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise ProjectError(f"cannot read {path}: {error}; download this file again") from None
    ndim = 3 if kind == "images" else 1
    header_bytes = 4 + 4 * ndim
    if len(raw) < header_bytes:
        raise ProjectError(f"{path} is too short to be an IDX file ({len(raw)} bytes); download it again")
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[kind]:
        raise ProjectError(
            f"{path} is not an MNIST {kind} file (IDX magic {magic:#010x}, expected {IDX_MAGIC[kind]:#010x}); "
            "check the file name or download it again"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header_bytes + math.prod(shape):  # Python ints: no overflow on a corrupt header
        raise ProjectError(
            f"{path} is truncated or padded: its header says {shape} but it holds "
            f"{len(raw) - header_bytes} bytes of data; download it again"
        )
    if kind == "images" and shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ProjectError(f"{path} holds {shape[1]}x{shape[2]} images, expected 28x28")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


def find_idx_file(folder, name):
    """The file `name` or `name.gz` in `folder` or in torchvision's `folder/MNIST/raw`, else None."""
    for directory in (Path(folder), Path(folder) / "MNIST" / "raw"):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def download_mnist(folder):
    """Fetch MNIST with torchvision (tries its mirrors) into folder/MNIST/raw."""
    from torchvision.datasets import MNIST

    print(f"MNIST not found in {folder}/, downloading it with torchvision ...")
    try:
        for train in (True, False):
            MNIST(root=str(folder), train=train, download=True)
    except Exception as error:  # torchvision raises RuntimeError/URLError/OSError depending on what failed
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ProjectError(
            f"could not download MNIST into {folder}/ ({reason}); on an offline machine pass "
            "--data-dir FOLDER holding the four IDX files (train-images-idx3-ubyte[.gz], ...)"
        ) from None


def load_mnist(folder):
    """Return {"train": (images, labels), "test": (images, labels)} as uint8/int64 tensors.

    images: (N, 28, 28) uint8, labels: (N,) int64. Reads the four IDX files from `folder`
    (flat or in torchvision's MNIST/raw layout, gzipped or not); downloads them only when none is there.
    """
    names = [name for pair in MNIST_FILES.values() for name in pair]
    found = {name: find_idx_file(folder, name) for name in names}
    if not any(found.values()):
        download_mnist(folder)
        found = {name: find_idx_file(folder, name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ProjectError(
            f"{folder}/ lacks {missing[0]}[.gz] (of the four MNIST IDX files); "
            "copy it there, or point --data-dir at a folder that has all four"
        )
    splits = {}
    for split, (images_name, labels_name) in MNIST_FILES.items():
        images = read_idx(found[images_name], "images")
        labels = read_idx(found[labels_name], "labels")
        if len(images) != len(labels):
            raise ProjectError(
                f"{found[images_name]} holds {len(images)} images but {found[labels_name]} holds "
                f"{len(labels)} labels; the two files must come from the same release"
            )
        splits[split] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    return splits


def to_model_input(images, device):
    """uint8 (N, 28, 28) -> float32 (N, 784) in [0, 1] on `device`, converted once for the whole set."""
    return images.to(device).reshape(len(images), -1).float().div_(255.0)


def pick_device(name):
    """The device `name` ("auto": CUDA, then Apple MPS, then CPU), with TF32 matmuls turned on for CUDA."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: ~10-bit mantissa products, fp32 accumulation
    return device


# ----------------------------------------------------------------------------- files

def write_atomically(path, write):
    """Call write(temporary_path), then rename it over `path`, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def check_writable(folder):
    """Fail before training, not after it, when results could not be saved."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ProjectError(f"cannot write to {folder}/ ({error.strerror}); pick another folder or fix its permissions") from None


def checkpoint_path(checkpoint_dir, kind):
    return Path(checkpoint_dir) / f"{kind}.pt"


def save_checkpoint(path, checkpoint):
    write_atomically(path, lambda temporary: torch.save(checkpoint, temporary))


def load_checkpoint(path):
    """Load a checkpoint dict; weights_only=True so a file from elsewhere cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise ProjectError(f"no checkpoint at {path}; train first with `python main.py` (or fix --checkpoint-dir)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ProjectError(f"{path} is not a readable checkpoint ({reason}); retrain or restore it") from None
    if not isinstance(checkpoint, dict) or not {"config", "model", "history"} <= checkpoint.keys():
        raise ProjectError(f"{path} is not a checkpoint of this project; retrain or restore it")
    return checkpoint


def save_json(path, data):
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"))


def save_figure(figure, path):
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))


# ----------------------------------------------------------------------------- metrics

@torch.inference_mode()
def evaluate_loss(model, images, batch_size=2000):
    """Mean per-image loss and loss parts (nats) over `images` (N, 784), in large batches."""
    model.eval()
    totals = {}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        loss, parts = model(batch)
        for name, value in {"loss": loss, **parts}.items():
            totals[name] = totals.get(name, 0.0) + value * len(batch)
    return {name: (total / len(images)).item() for name, total in totals.items()}


@torch.inference_mode()
def encode_all(model, images, batch_size=2000):
    """(N, 784) -> (N, latent_dim) codes (posterior means for the VAE)."""
    model.eval()
    return torch.cat([model.encode(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])


@torch.inference_mode()
def decode_images(model, z):
    """(N, latent_dim) -> (N, 1, 28, 28) images in [0, 1] (Bernoulli means)."""
    model.eval()
    return torch.sigmoid(model.decode(z)).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)


# ----------------------------------------------------------------------------- figures
# Every figure takes `models`, a dict like {"VAE": vae, "AE": ae}, so it works with one model or several.

def grid_image(images, nrow):
    """(N, 1, 28, 28) in [0, 1] -> (H, W) numpy array, tiles separated by thin grey lines."""
    return make_grid(images.float().cpu(), nrow=nrow, padding=2, pad_value=0.5)[0].numpy()


def show(ax, image, title=None):
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=11)


def plot_generation(models, path, *, n_side=8, seed=0):
    """Decode z ~ N(0, I) with each model: the VAE was trained for this, the AE was not."""
    figure = Figure(figsize=(4.2 * len(models), 4.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(models)))
    for ax, (name, model) in zip(axes, models.items()):
        device = next(model.parameters()).device
        noise = torch.Generator().manual_seed(seed)
        z = torch.randn(n_side * n_side, model.latent_dim, generator=noise).to(device)
        show(ax, grid_image(decode_images(model, z), n_side), f"{name}: decoded z ~ N(0, I)")
    figure.suptitle(f"{n_side * n_side} samples from the prior (same seed for each model)", fontsize=12)
    save_figure(figure, path)


def pick_pairs(labels, digit_pairs=((2, 7), (4, 1))):
    """First test index of each digit in each pair; falls back to consecutive indices."""
    pairs = []
    for k, (a, b) in enumerate(digit_pairs):
        index_a = (labels == a).nonzero()
        index_b = (labels == b).nonzero()
        if len(index_a) and len(index_b):
            pairs.append((int(index_a[0]), int(index_b[0])))
        else:
            pairs.append((2 * k, 2 * k + 1))
    return pairs


def plot_interpolation(models, images, labels, path, *, steps=10):
    """Decode a straight line between the posterior means (AE: codes) of two real test digits."""
    pairs = pick_pairs(labels)
    rows = [(name, model, pair) for pair in pairs for name, model in models.items()]
    figure = Figure(figsize=(12, 1.25 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), 3, width_ratios=[1, steps, 1], squeeze=False)
    for row, (name, model, (a, b)) in enumerate(rows):
        codes = encode_all(model, images[[a, b]])  # (2, latent_dim)
        t = torch.linspace(0, 1, steps, device=codes.device)[:, None]  # (steps, 1)
        path_images = decode_images(model, (1 - t) * codes[0] + t * codes[1])  # (steps, 1, 28, 28)
        real = images[[a, b]].reshape(2, 1, IMAGE_SIDE, IMAGE_SIDE)
        first = row == 0
        show(axes[row, 0], grid_image(real[:1], 1), "real" if first else None)
        show(axes[row, 1], grid_image(path_images, steps), "decoded path, z = (1-t) z_a + t z_b" if first else None)
        show(axes[row, 2], grid_image(real[1:], 1), "real" if first else None)
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=13)
    figure.suptitle("Interpolation between two real test digits in each model's latent space", fontsize=12)
    save_figure(figure, path)


def plot_reconstruction(models, images, path, *, count=16):
    """First `count` test digits and each model's reconstruction (decoded posterior mean / code)."""
    originals = images[:count].reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    rows = [("real", originals)]
    rows += [(name, decode_images(model, encode_all(model, images[:count]))) for name, model in models.items()]
    figure = Figure(figsize=(12, 1.0 * len(rows) + 0.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(len(rows), 1))
    for ax, (name, row_images) in zip(axes, rows):
        show(ax, grid_image(row_images, count))
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=13)
    figure.suptitle("Test digits and their reconstructions", fontsize=12)
    save_figure(figure, path)


def project_2d(codes):
    """(N, D) -> (N, 2): the codes themselves when D == 2, else their coordinates along the top two
    principal axes. The projection is orthonormal and not centred, so N(0, I) still looks like N(0, I)."""
    if codes.shape[1] == 2:
        return codes, ("z[0]", "z[1]")
    centred = codes - codes.mean(dim=0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)  # rows of v: principal axes
    return codes @ v[:2].T, ("principal axis 1", "principal axis 2")


def plot_latent_scatter(models, images, labels, path):
    """Test-set codes, coloured by digit, with circles at 1, 2, 3 standard deviations of N(0, I)."""
    figure = Figure(figsize=(5.6 * len(models) + 1.0, 5.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(models)))
    labels = labels.cpu().numpy()
    for ax, (name, model) in zip(axes, models.items()):
        points, axis_names = project_2d(encode_all(model, images).float().cpu())
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5,
                             s=2, alpha=0.6, rasterized=True)
        for radius in (1, 2, 3):
            circle_t = np.linspace(0, 2 * np.pi, 200)
            ax.plot(radius * np.cos(circle_t), radius * np.sin(circle_t), "k--", lw=0.8,
                    label="N(0, I): 1, 2, 3 sd" if radius == 1 else None)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel(axis_names[0])
        ax.set_ylabel(axis_names[1])
        ax.set_title(f"{name}: {model.latent_dim}-D codes of the test set", fontsize=11)
        ax.legend(loc="upper right", fontsize=8)
    colorbar = figure.colorbar(scatter, ax=list(axes), ticks=range(10))
    colorbar.set_label("digit (used only for colour)")
    figure.suptitle("Latent codes of test digits (VAE: posterior means) against the N(0, I) prior", fontsize=12)
    save_figure(figure, path)


def plot_loss_curves(histories, path):
    """histories: {"VAE": history, ...}; train (running mean over the epoch) and test loss per epoch."""
    figure = Figure(figsize=(5.0 * len(histories), 4.0), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(histories)))
    for ax, (name, history) in zip(axes, histories.items()):
        epochs = [record["epoch"] for record in history]
        ax.plot(epochs, [record["train"]["loss"] for record in history], "o-", ms=3,
                label="train (running mean over the epoch)")
        ax.plot(epochs, [record["test"]["loss"] for record in history], "s-", ms=3, label="test")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss per image (nats)")
        what = "negative ELBO" if "kl" in history[-1]["test"] else "BCE"
        ax.set_title(f"{name}: {what}", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(figure, path)
