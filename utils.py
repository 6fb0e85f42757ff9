"""Data, checkpoints, metrics and figures. Nothing here runs at import time."""
import gzip
import io
import json
import math
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid

from models import DigitClassifier, bernoulli_nll_per_image, kl_per_dimension, reparameterize

IMAGE_SIDE = 28
MNIST_FILES = {  # split -> (images file, labels file), as the official site names them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes, 3 dims / 1 dim


@dataclass(frozen=True)
class Dataset:
    """A 28x28, 10-class dataset shipped as the four MNIST-style IDX files."""
    title: str
    torchvision_class: str  # in torchvision.datasets; it downloads into folder/<torchvision_class>/raw
    classes: tuple
    interpolation_pairs: tuple  # two (class, class) pairs for interpolation.png


DATASETS = {
    "mnist": Dataset("MNIST", "MNIST", tuple("0123456789"), ((2, 7), (4, 1))),
    "fashion-mnist": Dataset("Fashion-MNIST", "FashionMNIST",
                             ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                              "Bag", "Ankle boot"), ((7, 9), (0, 3))),  # sneaker -> ankle boot, T-shirt -> dress
}


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


def find_idx_file(folder, name, dataset="mnist"):
    """The file `name` or `name.gz` in `folder` or in torchvision's `folder/<MNIST or FashionMNIST>/raw`, else None."""
    for directory in (Path(folder), Path(folder) / DATASETS[dataset].torchvision_class / "raw"):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def download(folder, dataset):
    """Fetch the dataset with torchvision (which tries its mirrors) into folder/<torchvision class>/raw."""
    import torchvision.datasets

    info = DATASETS[dataset]
    print(f"{info.title} not found in {folder}/, downloading it with torchvision ...")
    try:
        for train in (True, False):
            getattr(torchvision.datasets, info.torchvision_class)(root=str(folder), train=train, download=True)
    except Exception as error:  # torchvision raises RuntimeError/URLError/OSError depending on what failed
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ProjectError(
            f"could not download {info.title} into {folder}/ ({reason}); on an offline machine pass "
            "--data-dir FOLDER holding the four IDX files (train-images-idx3-ubyte[.gz], ...)"
        ) from None


def load_dataset(folder, dataset="mnist"):
    """Return {"train": (images, labels), "test": (images, labels)} as uint8/int64 tensors.

    images: (N, 28, 28) uint8, labels: (N,) int64. Reads the four IDX files from `folder` (flat or in
    torchvision's raw layout, gzipped or not); downloads them only when none is there. MNIST and Fashion-MNIST
    use the same file names, so a flat folder is taken to hold the dataset asked for.
    """
    names = [name for pair in MNIST_FILES.values() for name in pair]
    found = {name: find_idx_file(folder, name, dataset) for name in names}
    if not any(found.values()):
        download(folder, dataset)
        found = {name: find_idx_file(folder, name, dataset) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ProjectError(
            f"{folder}/ lacks {missing[0]}[.gz] (of the four {DATASETS[dataset].title} IDX files); "
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


BINARIZATION_SEEDS = {"train": 1, "test": 2}  # fixed, so every run with --binarize sees the same test set


def binarized(images, binarize, split):
    """The targets a model with this --binarize setting trains or is tested on: grey pixels (none), one fixed
    Bernoulli sample of every pixel (static; and the test set under dynamic), or, for dynamic training, the grey
    images themselves, which train_epoch samples afresh for each batch."""
    if binarize == "none" or (binarize == "dynamic" and split == "train"):
        return images
    generator = torch.Generator(device=images.device).manual_seed(BINARIZATION_SEEDS[split])
    return torch.bernoulli(images, generator=generator)


def pick_device(name):
    """The device `name` ("auto": CUDA, then Apple MPS, then CPU), with TF32 matmuls turned on for CUDA."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: ~10-bit mantissa products, fp32 accumulation
    return device


def check_bf16(device):
    """Fail with a one-line error if bfloat16 autocast cannot train on `device`; say so where it would be slow."""
    if device.type not in ("cpu", "cuda"):
        raise ProjectError(f"--precision bf16 is for CPUs and CUDA GPUs, not {device.type}; use --precision fp32")
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ProjectError(f"{device} has no bfloat16 support; train with --precision fp32")
        return
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    native = capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    if capabilities.get("architecture") == "x86_64" and not native:
        print("note: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so --precision bf16 emulates them "
              "and will likely train slower than fp32")


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
        raise ProjectError(
            f"cannot write to {folder}/ ({error.strerror}); pick another folder or fix its permissions") from None


def checkpoint_path(checkpoint_dir, kind):
    return Path(checkpoint_dir) / f"{kind}.pt"


def save_checkpoint(path, checkpoint):
    write_atomically(path, lambda temporary: torch.save(checkpoint, temporary))


def load_checkpoint(path, *, fix="retrain or restore it"):
    """Load a checkpoint dict; weights_only=True so a file from elsewhere cannot run code. `fix` ends the error
    message of a file that is there but unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ProjectError(f"no checkpoint at {path}; train first with `python main.py` (or fix --checkpoint-dir)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ProjectError(f"{path} is not a readable checkpoint ({reason}); {fix}") from None
    if not isinstance(checkpoint, dict) or not {"config", "model", "history"} <= checkpoint.keys():
        raise ProjectError(f"{path} is not a checkpoint of this project; {fix}")
    return checkpoint


def save_json(path, data):
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"))


def save_figure(figure, path):
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))


# ----------------------------------------------------------------------------- metrics

@torch.inference_mode()
def evaluate_loss(model, images, batch_size=2000, noise=None):
    """Mean per-image loss parts (nats) over `images` (N, 784), in large batches, and their sum as "loss"
    (the VAE's negative ELBO, the AE's BCE). noise: the generator the VAE samples z with (None: the global one)."""
    model.eval()
    totals = {}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        _, parts = model(batch, noise=noise)
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + value * len(batch)
    means = {name: (total / len(images)).item() for name, total in totals.items()}
    return {"loss": sum(means.values()), **means}


@torch.inference_mode()
def encode_all(model, images, batch_size=2000):
    """(N, 784) -> (N, latent_dim) codes (posterior means for the VAE)."""
    model.eval()
    return torch.cat([model.encode(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])


@torch.inference_mode()
def sample_posterior(model, images, batch_size=2000):
    """VAE: one z ~ q(z|x) per image, (N, latent_dim): together a sample of the aggregate posterior."""
    model.eval()
    return torch.cat([reparameterize(*model.posterior(images[s:s + batch_size]))
                      for s in range(0, len(images), batch_size)])


@torch.inference_mode()
def decode_images(model, z):
    """(N, latent_dim) -> (N, 1, 28, 28) images in [0, 1] (Bernoulli means)."""
    model.eval()
    return torch.sigmoid(model.decode(z)).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)


@torch.inference_mode()
def reconstruction_errors(model, images, targets, batch_size=2000):
    """Decode each code (VAE: posterior mean) and compare: BCE against the model's targets (nats per image),
    MSE per pixel, PSNR (dB, peak 1) and SSIM against the grey `images`, each averaged over images."""
    model.eval()
    scores = {"bce": [], "mse": [], "psnr": [], "ssim": []}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        logits = model.decode(model.encode(batch))  # (B, 784)
        target = targets[start:start + batch_size]
        reconstruction = torch.sigmoid(logits)  # Bernoulli means, in [0, 1]
        scores["bce"].append(bernoulli_nll_per_image(logits, target))
        squared_error = (reconstruction - batch).pow(2).mean(dim=1)  # (B,)
        scores["mse"].append(squared_error)
        scores["psnr"].append(-10 * torch.log10(squared_error.clamp(min=1e-10)))
        scores["ssim"].append(ssim(reconstruction, batch))
    return {name: torch.cat(values).mean().item() for name, values in scores.items()}


def ssim(images_a, images_b, *, window=11, sigma=1.5):
    """Structural similarity (Wang et al. 2004) of each pair of images in [0, 1]: (N, 784), (N, 784) -> (N,).

    Local means, variances and covariance under an 11x11 Gaussian window (sigma 1.5), C1 = 0.01^2,
    C2 = 0.03^2, averaged over the window positions that fit inside the 28x28 image (18x18 of them)."""
    a = images_a.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE).float()
    b = images_b.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE).float()
    taps = torch.exp(-(torch.arange(window, dtype=torch.float, device=a.device) - window // 2) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    # the window is separable: a 1x11 then an 11x1 pass, on all five maps at once
    maps = torch.cat([a, b, a * a, b * b, a * b])  # (5N, 1, 28, 28)
    local = F.conv2d(F.conv2d(maps, taps.reshape(1, 1, 1, -1)), taps.reshape(1, 1, -1, 1))  # (5N, 1, 18, 18)
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = local.double().chunk(5)
    var_a, var_b = mean_aa - mean_a**2, mean_bb - mean_b**2
    covariance = mean_ab - mean_a * mean_b
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)
             / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)))  # (N, 1, 18, 18)
    return index.mean(dim=(1, 2, 3)).float()


@torch.inference_mode()
def iwae_nll(model, images, num_samples, *, batch_size=50, chunk_size=100):
    """Importance-weighted estimate of -log p(x) per image (nats), mean over `images` (Burda et al. 2015):
    -log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z | x). An upper bound on the NLL that tightens with K;
    K = 1 is the negative ELBO. Samples are drawn `chunk_size` at a time and combined with a running logsumexp,
    so memory stays near chunk_size * batch_size * 784 floats whatever K is. 5,000 decoder rows a call was the
    fastest on a 2-core CPU (3.0 s per 100,000 decodes of the default model, against 9.3 s with 50,000 rows)."""
    model.eval()
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        log_sum = torch.full((len(batch),), -math.inf, device=batch.device, dtype=torch.float64)  # (B,)
        for drawn in range(0, num_samples, chunk_size):
            log_weights = model.log_importance_weights(batch, min(chunk_size, num_samples - drawn))  # (k, B)
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_weights.double(), dim=0))
        total += -(log_sum - math.log(num_samples)).sum().item()
    return total / len(images)


@torch.inference_mode()
def posterior_statistics(model, images, batch_size=2000):
    """VAE only: active units (dimensions whose posterior mean varies over `images`: Cov > 0.01, Burda et al.
    2015) and the mean KL to N(0, I) per latent dimension (nats)."""
    model.eval()
    mus, kls = [], []
    for start in range(0, len(images), batch_size):
        mu, logvar = model.posterior(images[start:start + batch_size])
        mus.append(mu)
        kls.append(kl_per_dimension(mu, logvar))
    activity = torch.cat(mus).var(dim=0)  # (D,)
    return {"active_units": int((activity > 0.01).sum()), "posterior_mean_variance": activity.tolist(),
            "kl_per_dimension": torch.cat(kls).mean(dim=0).tolist()}


class Gaussian:
    """N(mean, scale_tril @ scale_tril.T) in the latent space, to sample codes from with a seed."""

    def __init__(self, mean, scale_tril):
        self.mean, self.scale_tril = mean, scale_tril  # (D,), (D, D)

    @classmethod
    def standard(cls, dim, device):
        return cls(torch.zeros(dim, device=device), torch.eye(dim, device=device))

    @classmethod
    def fitted(cls, codes):
        """Maximum-likelihood Gaussian of `codes` (N, D), with a tiny ridge so a collapsed dimension still works."""
        covariance = torch.cov(codes.T.double()) + 1e-6 * torch.eye(codes.shape[1], device=codes.device)
        return cls(codes.mean(dim=0), torch.linalg.cholesky(covariance).float())

    def sample(self, count, seed):
        noise = torch.randn(count, len(self.mean), generator=torch.Generator().manual_seed(seed))
        return self.mean + noise.to(self.mean.device) @ self.scale_tril.T  # (count, D)


def gaussian_kl_to_standard(codes):
    """KL( N(m, S) || N(0, I) ) for the Gaussian fitted to `codes` (N, D): 0.5 (tr S + m.m - D - log det S)."""
    codes = codes.double()
    mean, covariance = codes.mean(dim=0), torch.cov(codes.T).reshape(codes.shape[1], codes.shape[1])
    log_det = torch.linalg.slogdet(covariance)[1]
    return 0.5 * (torch.trace(covariance) + mean @ mean - codes.shape[1] - log_det).item()


def code_statistics(codes):
    """How far the aggregate codes (N, D) are from N(0, I): per-dimension mean and std, and the KL above."""
    return {"mean": codes.mean(dim=0).tolist(), "std": codes.std(dim=0).tolist(),
            "gaussian_kl_to_prior": gaussian_kl_to_standard(codes)}


def knn_accuracy(codes, labels, k=5, batch_size=1000):
    """Leave-one-out k-nearest-neighbour accuracy of `labels` (N,) from `codes` (N, D), Euclidean, majority vote
    (ties go to the smaller label)."""
    codes, labels = codes.float(), labels.to(codes.device)
    correct = 0
    for start in range(0, len(codes), batch_size):
        distances = torch.cdist(codes[start:start + batch_size], codes)  # (b, N)
        rows = torch.arange(len(distances), device=codes.device)
        distances[rows, start + rows] = math.inf  # not its own neighbour
        neighbours = labels[distances.topk(k, largest=False).indices]  # (b, k)
        votes = torch.zeros(len(neighbours), int(labels.max()) + 1, device=codes.device)
        votes.scatter_add_(1, neighbours, torch.ones_like(neighbours, dtype=votes.dtype))
        correct += (votes.argmax(dim=1) == labels[start:start + batch_size]).sum().item()
    return correct / len(codes)


def frechet_distance(features_a, features_b):
    """||m_a - m_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets (N, F),
    the formula of the FID (Heusel et al. 2017), here on our own small classifier's features."""
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_a = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    # tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), whose argument is symmetric PSD
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mean_a - mean_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross).item()


def histogram_entropy(predicted, num_classes=10):
    """Entropy (bits) of the histogram of predicted classes: log2(10) = 3.32 when all ten are equally common."""
    counts = torch.bincount(predicted, minlength=num_classes).double()
    shares = counts[counts > 0] / counts.sum()
    return -(shares * shares.log2()).sum().item()


@torch.inference_mode()
def classify(classifier, images, batch_size=2000):
    """(N, 784) -> features (N, 128) and class probabilities (N, 10)."""
    classifier.eval()
    features = torch.cat([classifier.features(images[s:s + batch_size]) for s in range(0, len(images), batch_size)])
    return features, torch.softmax(classifier.head(features), dim=1)


def sample_quality(classifier, samples, reference_features):
    """Scores for decoded samples (N, 784): Frechet distance of the classifier's features to the test set's,
    the share classified with confidence above 0.9, and the entropy (bits) of the predicted-class histogram."""
    features, probabilities = classify(classifier, samples)
    confidence, predicted = probabilities.max(dim=1)
    return {"frechet_distance": frechet_distance(features, reference_features),
            "confident_share": (confidence > 0.9).float().mean().item(),
            "class_entropy_bits": histogram_entropy(predicted)}


def train_classifier(train_images, train_labels, test_images, test_labels, *, epochs=3, batch_size=128, seed=0):
    """Train the scoring CNN on the grey training images; return it with its test accuracy."""
    torch.manual_seed(seed)
    device = train_images.device
    classifier = DigitClassifier().to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    shuffle = torch.Generator(device=device).manual_seed(seed)
    train_labels = train_labels.to(device)
    for epoch in range(epochs):
        classifier.train()
        order = torch.randperm(len(train_images), generator=shuffle, device=device)
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            loss = F.cross_entropy(classifier(train_images[indices]), train_labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    _, probabilities = classify(classifier, test_images)
    accuracy = (probabilities.argmax(dim=1).cpu() == test_labels.cpu()).float().mean().item()
    return classifier, accuracy


def load_or_train_classifier(path, train_images, train_labels, test_images, test_labels):
    """The scoring classifier cached at `path`; trained (about a minute on a CPU) and saved there the first time."""
    path = Path(path)
    if path.exists():
        checkpoint = load_checkpoint(path, fix="delete it and it is retrained")
        classifier = DigitClassifier()
        try:
            classifier.load_state_dict(checkpoint["model"])
        except RuntimeError:
            raise ProjectError(f"{path} does not hold this project's classifier; delete it and it is "
                               "retrained") from None
        return classifier.to(train_images.device), checkpoint["test_accuracy"]
    print(f"training the classifier that scores samples (once; cached in {path}) ...")
    classifier, accuracy = train_classifier(train_images, train_labels, test_images, test_labels)
    save_checkpoint(path, {"config": {"kind": "classifier"}, "model": classifier.state_dict(), "history": [],
                           "test_accuracy": accuracy})
    return classifier, accuracy


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


def plot_generation(samplers, path, *, n_side=8, seed=0):
    """samplers: {"VAE, z ~ N(0, I)": (model, Gaussian), ...}. Decode codes drawn from each: the VAE was trained
    for its prior, the AE was not; a Gaussian fitted to the AE's codes is its fair chance."""
    figure = Figure(figsize=(4.2 * len(samplers) + 1.2, 4.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(samplers)))
    for ax, (label, (model, gaussian)) in zip(axes, samplers.items()):
        images = decode_images(model, gaussian.sample(n_side * n_side, seed))
        show(ax, grid_image(images, n_side), label.replace("Gaussian fitted", "\nGaussian fitted"))
    figure.suptitle(f"{n_side * n_side} decoded samples per sampler (same noise for each)", fontsize=12)
    save_figure(figure, path)


def plot_manifold(model, posterior_mean_variance, path, *, n_side=20):
    """The classic 20x20 grid: decode z over the two latent dimensions whose posterior means vary most over the
    test set (all of z when it is 2-D), at the 5%..95% quantiles of N(0, 1); every other dimension at 0."""
    first, second = torch.tensor(posterior_mean_variance).topk(2).indices.tolist()
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n_side))
    device = next(model.parameters()).device
    z = torch.zeros(n_side, n_side, model.latent_dim, device=device)
    z[:, :, second] = quantiles.flip(0)[:, None].to(device)  # rows: top to bottom = high to low
    z[:, :, first] = quantiles[None, :].to(device)  # columns: left to right = low to high
    figure = Figure(figsize=(8, 8.4), layout="constrained")
    ax = figure.subplots()
    show(ax, grid_image(decode_images(model, z.reshape(-1, model.latent_dim)), n_side))
    if model.latent_dim == 2:
        ax.set_title("VAE with a 2-D latent space: decoded grid over z", fontsize=12)
    else:
        ax.set_title(f"VAE: decoded grid over latent dimensions {first} (across) and {second} (down), the two most "
                     f"active of {model.latent_dim};\nthe other dimensions at 0; N(0, 1) quantiles 5% to 95%",
                     fontsize=11)
    save_figure(figure, path)


def pick_pairs(labels, class_pairs):
    """First test index of each class in each pair; falls back to consecutive indices."""
    pairs = []
    for k, (a, b) in enumerate(class_pairs):
        index_a = (labels == a).nonzero()
        index_b = (labels == b).nonzero()
        if len(index_a) and len(index_b):
            pairs.append((int(index_a[0]), int(index_b[0])))
        else:
            pairs.append((2 * k, 2 * k + 1))
    return pairs


def plot_interpolation(models, images, labels, dataset, path, *, steps=10):
    """Decode a straight line between the posterior means (AE: codes) of two real test images."""
    pairs = pick_pairs(labels, dataset.interpolation_pairs)
    rows = [(name, model, pair) for pair in pairs for name, model in models.items()]
    figure = Figure(figsize=(12, 1.25 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), 3, width_ratios=[1, steps, 1], squeeze=False)
    for row, (name, model, (a, b)) in enumerate(rows):
        codes = encode_all(model, images[[a, b]])  # (2, latent_dim)
        t = torch.linspace(0, 1, steps, device=codes.device)[:, None]  # (steps, 1)
        path_images = decode_images(model, (1 - t) * codes[0] + t * codes[1])  # (steps, 1, 28, 28)
        real = images[[a, b]].reshape(2, 1, IMAGE_SIDE, IMAGE_SIDE)
        first = row == 0
        show(axes[row, 0], grid_image(real[:1], 1), dataset.classes[labels[a]])
        show(axes[row, 1], grid_image(path_images, steps), "decoded path, z = (1-t) z_a + t z_b" if first else None)
        show(axes[row, 2], grid_image(real[1:], 1), dataset.classes[labels[b]])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=13)
    figure.suptitle(f"Interpolation between two real {dataset.title} test images in each model's latent space",
                    fontsize=12)
    save_figure(figure, path)


def plot_reconstruction(models, images, dataset, path, *, count=16):
    """First `count` test images and each model's reconstruction (decoded posterior mean / code)."""
    originals = images[:count].reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    rows = [("real", originals)]
    rows += [(name, decode_images(model, encode_all(model, images[:count]))) for name, model in models.items()]
    figure = Figure(figsize=(12, 1.0 * len(rows) + 0.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(len(rows), 1))
    for ax, (name, row_images) in zip(axes, rows):
        show(ax, grid_image(row_images, count))
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=13)
    figure.suptitle(f"{dataset.title} test images and their reconstructions", fontsize=12)
    save_figure(figure, path)


def principal_axes(codes):
    """(N, D) -> (D, 2): the identity when D == 2, else the top two principal axes of the codes (orthonormal)."""
    if codes.shape[1] == 2:
        return torch.eye(2, dtype=codes.dtype, device=codes.device)
    _, _, v = torch.linalg.svd(codes - codes.mean(dim=0), full_matrices=False)  # rows of v: principal axes
    return v[:2].T


def axis_names(latent_dim):
    return ("z[0]", "z[1]") if latent_dim == 2 else ("principal axis 1", "principal axis 2")


def draw_codes(ax, points, labels, *, title, axis_labels):
    """Scatter 2-D points coloured by class, with the N(0, I) circles at 1, 2, 3 sd; returns the scatter."""
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5,
                         s=2, alpha=0.6, rasterized=True)
    circle_t = np.linspace(0, 2 * np.pi, 200)
    for radius in (1, 2, 3):
        ax.plot(radius * np.cos(circle_t), radius * np.sin(circle_t), "k--", lw=0.8,
                label="N(0, I): 1, 2, 3 sd" if radius == 1 else None)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title, fontsize=11)
    ax.legend(loc="upper right", fontsize=8)
    return scatter


def class_colorbar(figure, scatter, axes, dataset):
    colorbar = figure.colorbar(scatter, ax=list(axes), ticks=range(10))
    colorbar.ax.set_yticklabels(dataset.classes)
    colorbar.set_label("class (used only for colour)")


def plot_latent_scatter(models, images, labels, dataset, path):
    """Test-set codes, coloured by class, with circles at 1, 2, 3 standard deviations of N(0, I). The projection
    onto the principal axes is orthonormal and not centred, so N(0, I) still looks like N(0, I)."""
    figure = Figure(figsize=(5.6 * len(models) + 1.6, 5.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(models)))
    labels = labels.cpu().numpy()
    for ax, (name, model) in zip(axes, models.items()):
        codes = encode_all(model, images).float().cpu()
        scatter = draw_codes(ax, codes @ principal_axes(codes), labels, axis_labels=axis_names(model.latent_dim),
                             title=f"{name}: {model.latent_dim}-D codes of the test set")
        ax.set_aspect("equal", adjustable="datalim")
    class_colorbar(figure, scatter, axes, dataset)
    figure.suptitle(f"Latent codes of {dataset.title} test images (VAE: posterior means) against the N(0, I) prior",
                    fontsize=12)
    save_figure(figure, path)


def write_latent_evolution(histories, labels, dataset, path, *, seconds_per_frame=0.25):
    """Animate the test codes each history recorded (history[i]["codes"]: (n, D) float16) as a GIF, one frame
    per recorded epoch; each model keeps the principal axes and the limits of its last frame."""
    from PIL import Image  # Pillow: installed with matplotlib and torchvision

    epochs = sorted(set.intersection(*({r["epoch"] for r in h if "codes" in r} for h in histories.values())))
    if not epochs:
        return
    codes = {name: {r["epoch"]: r["codes"].float() for r in h if "codes" in r} for name, h in histories.items()}
    axes_of = {name: principal_axes(by_epoch[epochs[-1]]) for name, by_epoch in codes.items()}
    limits = {name: 1.15 * max(3.5, float((by_epoch[epochs[-1]] @ axes_of[name]).abs().quantile(0.998)))
              for name, by_epoch in codes.items()}
    labels = labels.cpu().numpy()
    frames = []
    for epoch in epochs:
        figure = Figure(figsize=(4.6 * len(histories) + 1.6, 4.8), dpi=80, layout="constrained")
        axes = np.atleast_1d(figure.subplots(1, len(histories)))
        for ax, (name, by_epoch) in zip(axes, codes.items()):
            scatter = draw_codes(ax, by_epoch[epoch] @ axes_of[name], labels, title=name,
                                 axis_labels=axis_names(by_epoch[epoch].shape[1]))
            ax.set_xlim(-limits[name], limits[name])
            ax.set_ylim(-limits[name], limits[name])
            ax.set_aspect("equal")
        class_colorbar(figure, scatter, axes, dataset)
        figure.suptitle(f"{dataset.title} test codes after epoch {epoch}", fontsize=12)
        rendered = io.BytesIO()
        figure.savefig(rendered, format="png")
        frames.append(Image.open(rendered).convert("RGB").quantize(colors=64))
    durations = [int(1000 * seconds_per_frame)] * (len(frames) - 1) + [2000]  # hold the last frame
    write_atomically(path, lambda temporary: frames[0].save(temporary, format="GIF", save_all=True,
                                                            append_images=frames[1:], duration=durations, loop=0))


STUDY_COLUMNS = [("mse", "MSE per pixel"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"),
                 ("test_loss", "test loss (nats)"), ("test_nll_iwae", "IWAE NLL (nats)")]


def latent_study_table(study):
    """study: {"2": {"vae": {...}, "ae": {...}}, ...} -> a Markdown table, one row per latent size and model."""
    lines = ["| latent size | model | " + " | ".join(title for _, title in STUDY_COLUMNS) + " |",
             "|---|---|" + "---|" * len(STUDY_COLUMNS)]
    for size, row in study.items():
        for kind, values in row.items():
            cells = [f"{values[key]:.4f}" if key in ("mse", "ssim") else f"{values[key]:.2f}" if key in values else "-"
                     for key, _ in STUDY_COLUMNS]
            lines.append(f"| {size} | {kind.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_latent_study(study, path):
    """One panel per reconstruction score, and the VAE's test negative ELBO, against the latent size."""
    sizes = [int(size) for size in study]
    panels = [("mse", "test MSE per pixel"), ("psnr", "test PSNR (dB)"), ("ssim", "test SSIM"),
              ("test_loss", "VAE test negative ELBO (nats)")]
    figure = Figure(figsize=(16, 3.8), layout="constrained")
    for ax, (key, title) in zip(figure.subplots(1, len(panels)), panels):
        for kind, marker in (("vae", "o-"), ("ae", "s-")):
            if key == "test_loss" and kind == "ae":
                continue  # the AE's loss is its BCE: not a likelihood bound, not comparable
            points = [(size, row[kind][key]) for size, row in zip(sizes, study.values()) if kind in row]
            if points:
                ax.plot(*zip(*points), marker, label=kind.upper())
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.set_xlabel("latent size")
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("Latent-size study: reconstruction of the test set (decoded posterior means / codes)", fontsize=12)
    save_figure(figure, path)


def plot_loss_curves(histories, path):
    """histories: {"VAE": history, ...}; train (running mean over the epoch) and test loss per epoch."""
    figure = Figure(figsize=(5.0 * len(histories), 4.0), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(histories)))
    for ax, (name, history) in zip(axes, histories.items()):
        epochs = [record["epoch"] for record in history]
        markers = len(history) <= 60
        ax.plot(epochs, [record["train"]["loss"] for record in history], "o-" if markers else "-", ms=3,
                label="train (running mean over the epoch)")
        ax.plot(epochs, [record["test"]["loss"] for record in history], "s-" if markers else "-", ms=3, label="test")
        if not markers:  # a long run: leave out the first 2% of epochs, which would flatten the rest
            later = history[len(history) // 50:]
            ax.set_ylim(top=max(max(r["train"]["loss"], r["test"]["loss"]) for r in later) + 1)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss per image (nats)")
        what = "negative ELBO" if "kl" in history[-1]["test"] else "BCE"
        ax.set_title(f"{name}: {what}", fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(figure, path)
