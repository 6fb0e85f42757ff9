"""What main.py uses besides the models, in four sections: data (IDX files, datasets, devices),
checkpoints (and every other file written: atomically, in locked folders), metrics (losses, codes,
the IWAE bound, sample scores and the classifier behind them) and figures. Nothing runs on
import."""
import gzip
import json
import math
import os
import re
import shutil
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm

from models import DigitClassifier, bernoulli_nll_per_image, kl_per_dimension

try:
    import fcntl
except ImportError:  # Windows: no folder locks
    fcntl = None


class ProjectError(Exception):
    """A problem the user can fix: main() prints it as one line, with no traceback, and exits
    with exit_code."""

    def __init__(self, message, exit_code=1):
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------- data: IDX files, datasets, devices

IMAGE_SIDE = 28
MNIST_FILES = {  # split -> (images file, labels file), as the official site names them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned bytes, 3 dims / 1 dim
BINARIZATION_SEEDS = {"train": 1, "test": 2}  # fixed: every run with --binarize sees one test set


@dataclass(frozen=True)
class Dataset:
    """A 28x28, 10-class dataset shipped as the four MNIST-style IDX files."""
    title: str
    torchvision_class: str  # in torchvision.datasets, which downloads to folder/<this>/raw
    classes: tuple
    interpolation_pairs: tuple  # two (class, class) pairs for interpolation.png


DATASETS = {
    "mnist": Dataset("MNIST", "MNIST", tuple("0123456789"), ((2, 7), (4, 1))),
    "fashion-mnist": Dataset(
        "Fashion-MNIST", "FashionMNIST", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        ((7, 9), (0, 3))),  # sneaker -> ankle boot, T-shirt -> dress
}


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
        raise ProjectError(f"{path} is too short for an IDX file ({len(raw)} bytes); download it "
                           "again")
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[kind]:
        raise ProjectError(f"{path} is not an MNIST {kind} file (IDX magic {magic:#010x}, expected "
                           f"{IDX_MAGIC[kind]:#010x}); check the file name or download it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header_bytes + math.prod(shape):  # Python ints: no overflow on a bad header
        raise ProjectError(f"{path} is truncated or padded: its header says {shape} but it holds "
                           f"{len(raw) - header_bytes} bytes of data; download it again")
    if kind == "images" and shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise ProjectError(f"{path} holds {shape[1]}x{shape[2]} images, expected 28x28")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(shape)


def find_idx_file(folder, name, dataset="mnist"):
    """`name` or `name.gz` in `folder` or in torchvision's folder/<MNIST...>/raw, else None."""
    for directory in (Path(folder), Path(folder) / DATASETS[dataset].torchvision_class / "raw"):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def download(folder, dataset):
    """Fetch the dataset with torchvision (which tries its mirrors) into a temporary folder,
    then move its four .gz files to folder/<torchvision class>/raw: a failure leaves nothing."""
    import torchvision.datasets  # here, not at the top: importing torchvision takes a second

    info = DATASETS[dataset]
    print(f"{info.title} not found in {folder}/, downloading it with torchvision ...")
    with tempfile.TemporaryDirectory() as staging:
        try:
            for train in (True, False):
                getattr(torchvision.datasets, info.torchvision_class)(root=staging, train=train,
                                                                      download=True)
        except Exception as error:  # RuntimeError, URLError or OSError, by what failed
            raise ProjectError(f"could not download {info.title} into {folder}/ "
                               f"({first_line(error, 120)}); "
                               "offline, pass --data-dir FOLDER holding the four IDX files "
                               "(train-images-idx3-ubyte[.gz], ...)") from None
        target = Path(folder) / info.torchvision_class / "raw"
        target.mkdir(parents=True, exist_ok=True)
        for file in (Path(staging) / info.torchvision_class / "raw").glob("*.gz"):
            shutil.move(file, target / file.name)


def load_dataset(folder, dataset="mnist"):
    """{"train": (images, labels), "test": (images, labels)}: images (N, 28, 28) uint8, labels
    (N,) int64, from the four IDX files in `folder` (flat or in torchvision's raw layout, gzipped
    or not), downloaded there only when none is found. MNIST and Fashion-MNIST use the same
    file names, so a flat folder is taken to hold the one asked for."""
    names = [name for pair in MNIST_FILES.values() for name in pair]
    found = {name: find_idx_file(folder, name, dataset) for name in names}
    if not any(found.values()):
        download(folder, dataset)
        found = {name: find_idx_file(folder, name, dataset) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ProjectError(f"{folder}/ lacks {missing[0]}[.gz] (of the four "
                           f"{DATASETS[dataset].title} IDX files); copy it there, or point "
                           "--data-dir at a folder that has all four")
    splits = {}
    for split, (images_name, labels_name) in MNIST_FILES.items():
        images = read_idx(found[images_name], "images")
        labels = read_idx(found[labels_name], "labels")
        if len(images) != len(labels):
            raise ProjectError(f"{found[images_name]} holds {len(images)} images but "
                               f"{found[labels_name]} holds {len(labels)} labels; the two files "
                               "must come from the same release")
        splits[split] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    return splits


def to_model_input(images, device):
    """uint8 (N, 28, 28) -> float32 (N, 784) in [0, 1] on `device`, once for the whole set."""
    return images.to(device).reshape(len(images), -1).float().div_(255.0)


def binarized(images, binarize, split):
    """The targets a model with this --binarize trains or is tested on: the grey pixels (none),
    one fixed Bernoulli sample of each pixel (static, and the test set under dynamic), or for
    dynamic training the grey images, which train_epoch samples afresh for each batch."""
    if binarize == "none" or (binarize == "dynamic" and split == "train"):
        return images
    generator = torch.Generator(device=images.device).manual_seed(BINARIZATION_SEEDS[split])
    return torch.bernoulli(images, generator=generator)


def available_devices():
    devices = ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return devices + ["mps"] if torch.backends.mps.is_available() else devices


def pick_device(name):
    """The torch.device `name` ("auto": CUDA, then Apple MPS, then the CPU) if this machine has
    it, with TF32 matmuls on CUDA; any other name is an error that lists the devices here.
    Call it before any other torch work: it sets the CPU's mode for the threads torch starts."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else \
            "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
        known = f"cuda:{device.index or 0}" if device.type == "cuda" else device.type
    except RuntimeError:
        known = None
    if known not in available_devices():
        raise ProjectError(f"there is no device {name!r} here; this machine has: "
                           f"{', '.join(available_devices())}")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32: 10-bit mantissa products, fp32 sums
    # Numbers below 1e-38 (denormals) take a CPU's slow path, and Adam's moments for pixels that
    # are always blank decay into them by epoch 2: flushed to zero, epochs run 10-15% faster.
    # torch's threads inherit the mode from the thread that starts them, hence "before".
    torch.set_flush_denormal(True)
    return device


def check_bf16(device):
    """Fail in one line where bfloat16 autocast cannot train on `device`; say so where it would
    be slow."""
    if device.type not in ("cpu", "cuda"):
        raise ProjectError(f"--precision bf16 is for CPUs and CUDA GPUs, not {device.type}; use "
                           "--precision fp32")
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ProjectError(f"{device} has no bfloat16 support; train with --precision fp32")
        return
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    native = capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    if capabilities.get("architecture") == "x86_64" and not native:
        print("note: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so --precision "
              "bf16 emulates them and will likely train slower than fp32")


def first_line(error, limit):
    """The start of an exception's message, for a one-line error; its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def is_out_of_memory(error):
    """Whether `error` is a failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's."""
    text = str(error)
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in text or "out of memory" in text)


# ------------------------------------------------ checkpoints and files: atomic, in locked folders

def write_atomically(path, write):
    """Call write(temporary_path), then rename it over `path`: a crash, kill -9 or full disk
    never leaves half a file, and a failed write leaves the previous file as it was."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        kept = f"{path.name} keeps its previous contents" if path.exists() else "nothing is written"
        raise ProjectError(f"cannot write {path} ({error.strerror or error}); {kept}") from None
    finally:
        temporary.unlink(missing_ok=True)


def checkpoint_path(checkpoint_dir, kind):
    return Path(checkpoint_dir) / f"{kind}.pt"


def save_checkpoint(path, checkpoint):
    def write(temporary):
        with open(temporary, "wb") as file:  # a file, not a path: a full disk raises OSError
            torch.save(checkpoint, file)
    write_atomically(path, write)


def load_checkpoint(path, *, fix="retrain or restore it"):
    """Load a checkpoint dict. weights_only=True loads tensors and plain data only, so a file
    from elsewhere cannot run code. `fix` ends the message about a file that is unusable."""
    path = Path(path)
    if not path.is_file():
        raise ProjectError(f"no checkpoint at {path}; train first with `python main.py` (or fix "
                           "--checkpoint-dir)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        code = re.search(r"GLOBAL (\S+)", str(error))
        if code:  # a pickle that would import and call something while it is loaded
            raise ProjectError(f"{path} was refused: loading it would call {code.group(1)}, and "
                               f"only tensors and plain data are loaded; {fix}") from None
        raise ProjectError(f"{path} is not a readable checkpoint ({first_line(error, 80)}); "
                           f"{fix}") from None
    if not isinstance(checkpoint, dict) or not {"config", "model", "history"} <= checkpoint.keys():
        raise ProjectError(f"{path} is not a checkpoint of this project; {fix}")
    return checkpoint


def saved_epochs(paths):
    """What the checkpoint files `paths` hold, read from the disk: "ck/vae.pt holds epoch 3"."""
    held = []
    for path in map(Path, paths):
        if path.is_file():
            try:
                held.append(f"{path} holds epoch {load_checkpoint(path)['epoch']}")
            except ProjectError:
                held.append(f"{path} is unreadable")
    return "; ".join(held) or "no checkpoint is saved yet"


def save_json(path, data):
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(path, lambda temporary: temporary.write_text(text))


def save_figure(figure, path):
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))


class FolderLock:
    """Holds FOLDER/.lock while a run writes into FOLDER, so that a second run there stops at
    once, naming the first. The kernel drops the lock when its holder exits, however it dies
    (kill -9 too), so a folder left by a dead run is simply taken over."""

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")
        except OSError as error:
            raise ProjectError(f"cannot write to {self.path.parent}/ ({error.strerror}); pick "
                               "another folder or fix its permissions") from None
        if fcntl is not None:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "unknown"
                self.file.close()
                raise ProjectError(f"{self.path.parent}/ is in use by another run of main.py "
                                   f"(process {holder}); wait for it to end or pick another "
                                   "folder") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc_info):
        self.file.close()  # releases the lock


# ---------------------------------------------------------------------------------------- metrics

METRICS_NOTES = (  # what each number in metrics.json means, written into it as "notes"
    "Losses are per image in nats: the VAE's is the negative ELBO with one z per image (from a "
    "fixed seed), the AE's its BCE; targets are grey pixels as Bernoulli targets unless 'binarize' "
    "says otherwise (then the test set is one fixed Bernoulli sample). test_nll_iwae: importance-"
    "weighted estimate of -log p(x) with that many samples. reconstruction: decoded code (VAE: "
    "posterior mean) against the test image; mse per pixel, psnr in dB (peak 1) and ssim (11x11 "
    "Gaussian window) against grey pixels. samples: decoded samples scored by the project's "
    "classifier of the dataset's ten classes (frechet_distance of its 128-D features to the test "
    "set's; share classified with confidence > 0.9; entropy of the predicted-class histogram in "
    "bits, 3.32 when all ten are equally common). latent: leave-one-out 5-nearest-neighbour class "
    "accuracy on test codes (VAE: posterior means); aggregate_codes: test codes (VAE: z sampled "
    "from q(z|x)) per-dimension mean and std, and the KL from a Gaussian fitted to them to "
    "N(0, I). posterior: active units (Cov over the test set of the posterior mean > 0.01) and KL "
    "per dimension."
)


@torch.inference_mode()
def evaluate_loss(model, images, *, seed=0, batch_size=2000):
    """Mean loss parts per image (nats) over `images` (N, 784) and their sum as "loss": the VAE's
    negative ELBO with one z per image, drawn from a generator seeded with `seed` (so the same
    weights always score the same), the AE's BCE."""
    model.eval()
    noise = torch.Generator(device=images.device).manual_seed(seed)
    totals = {}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        _, parts = model(batch, noise=noise)
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + value.item() * len(batch)
    means = {name: total / len(images) for name, total in totals.items()}
    return {"loss": sum(means.values()), **means}


def batches(images, batch_size):
    return (images[start:start + batch_size] for start in range(0, len(images), batch_size))


@torch.inference_mode()
def encode(model, images, batch_size=2000):
    """(N, 784) -> codes (N, D) and the VAE's posterior log-variances (N, D) (None for the AE);
    the VAE's codes are its posterior means."""
    model.eval()
    if not hasattr(model, "posterior"):
        return torch.cat([model.encode(batch) for batch in batches(images, batch_size)]), None
    means, logvars = zip(*(model.posterior(batch) for batch in batches(images, batch_size)))
    return torch.cat(means), torch.cat(logvars)


def sample_codes(mu, logvar, seed=0):
    """One z ~ q(z|x) = N(mu, exp(logvar)) per image (N, D): a sample of the aggregate posterior."""
    noise = torch.Generator(device=mu.device).manual_seed(seed)
    return mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=noise, device=mu.device)


@torch.inference_mode()
def decode_images(model, z):
    """(N, latent_dim) -> (N, 1, 28, 28) images in [0, 1] (Bernoulli means)."""
    model.eval()
    return torch.sigmoid(model.decode(z)).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)


@torch.inference_mode()
def reconstruction_errors(model, codes, images, targets, batch_size=2000):
    """Decode `codes` (N, D) of `images` (N, 784) and compare: BCE against the model's targets
    (nats per image); MSE per pixel, PSNR (dB, peak 1) and SSIM against the grey images."""
    model.eval()
    scores = {"bce": [], "mse": [], "psnr": [], "ssim": []}
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        logits = model.decode(codes[start:start + batch_size])  # (B, 784)
        reconstruction = torch.sigmoid(logits)  # Bernoulli means, in [0, 1]
        scores["bce"].append(bernoulli_nll_per_image(logits, targets[start:start + batch_size]))
        squared_error = (reconstruction - batch).pow(2).mean(dim=1)  # (B,)
        scores["mse"].append(squared_error)
        scores["psnr"].append(-10 * torch.log10(squared_error.clamp(min=1e-10)))
        scores["ssim"].append(ssim(reconstruction, batch))
    return {name: torch.cat(values).mean().item() for name, values in scores.items()}


def ssim(images_a, images_b, *, window=11, sigma=1.5):
    """Structural similarity (Wang et al. 2004) of pairs of images in [0, 1], (N, 784) -> (N,):
    local means, variances and covariance under an 11x11 Gaussian window (sigma 1.5),
    C1 = 0.01^2, C2 = 0.03^2, averaged over the 18x18 window positions inside the image."""
    a, b = (images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE).float() for images in (images_a, images_b))
    taps = torch.exp(-(torch.arange(window, device=a.device) - window // 2) ** 2 / (2 * sigma**2))
    positions = IMAGE_SIDE - window + 1
    band = torch.zeros(IMAGE_SIDE, positions, device=a.device)  # column k: the window at k
    for k in range(positions):
        band[k:k + window, k] = taps / taps.sum()
    # the window is separable: band.T @ map @ band filters the columns, then the rows (8x faster
    # than conv2d on a CPU)
    local = band.T @ torch.stack([a, b, a * a, b * b, a * b]) @ band  # (5, N, 18, 18)
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = local.double()
    var_a, var_b, covariance = mean_aa - mean_a**2, mean_bb - mean_b**2, mean_ab - mean_a * mean_b
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)
             / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)))  # (N, 18, 18)
    return index.mean(dim=(1, 2)).float()


@torch.inference_mode()
def iwae_nll(model, images, num_samples, *, seed=0, batch_size=10, chunk_size=100, progress=False):
    """The importance-weighted estimate of -log p(x) per image (nats), mean over `images` (Burda
    et al. 2015): -log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z | x). An upper bound on the
    NLL that tightens as K grows; K = 1 is the negative ELBO. The samples are drawn `chunk_size`
    at a time and summed with a running logsumexp, so memory stays near chunk_size * batch_size
    * 784 floats whatever K is: 1,000 rows per decoder call stay in a CPU's caches (2x faster
    than 5,000)."""
    model.eval()
    noise = torch.Generator(device=images.device).manual_seed(seed)
    total = 0.0
    for batch in tqdm(batches(images, batch_size), total=math.ceil(len(images) / batch_size),
                      desc=f"IWAE bound, {num_samples} samples", leave=False,
                      disable=None if progress else True):
        log_sum = torch.full((len(batch),), -math.inf, device=batch.device, dtype=torch.float64)
        for drawn in range(0, num_samples, chunk_size):
            count = min(chunk_size, num_samples - drawn)
            log_weights = model.log_importance_weights(batch, count, noise)  # (count, B)
            log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_weights.double(), dim=0))
        total += -(log_sum - math.log(num_samples)).sum().item()
    return total / len(images)


def posterior_statistics(mu, logvar):
    """The VAE's posteriors of a set of images, each (N, D): its active units (dimensions whose
    posterior mean varies over the images: Cov > 0.01, Burda et al. 2015) and the mean KL to
    N(0, I) of each dimension (nats)."""
    activity = mu.var(dim=0)  # (D,)
    return {"active_units": int((activity > 0.01).sum()),
            "posterior_mean_variance": activity.tolist(),
            "kl_per_dimension": kl_per_dimension(mu, logvar).mean(dim=0).tolist()}


class Gaussian:
    """N(mean, scale_tril @ scale_tril.T) in the latent space, to sample codes from with a seed."""

    def __init__(self, mean, scale_tril):
        self.mean, self.scale_tril = mean, scale_tril  # (D,), (D, D)

    @classmethod
    def standard(cls, dim, device):
        return cls(torch.zeros(dim, device=device), torch.eye(dim, device=device))

    @classmethod
    def fitted(cls, codes):
        """The maximum-likelihood Gaussian of `codes` (N, D), with a tiny ridge so that a
        collapsed dimension still works."""
        dim = codes.shape[1]
        covariance = torch.cov(codes.T.double()).reshape(dim, dim)
        covariance += 1e-6 * torch.eye(dim, device=codes.device)
        return cls(codes.mean(dim=0), torch.linalg.cholesky(covariance).float())

    def sample(self, count, seed):
        noise = torch.randn(count, len(self.mean), generator=torch.Generator().manual_seed(seed))
        return self.mean + noise.to(self.mean.device) @ self.scale_tril.T  # (count, D)


def gaussian_kl_to_standard(codes):
    """KL( N(m, S) || N(0, I) ) for the Gaussian fitted to `codes` (N, D):
    0.5 (tr S + m.m - D - log det S)."""
    codes = codes.double()
    mean, covariance = codes.mean(dim=0), torch.cov(codes.T).reshape(codes.shape[1], -1)
    log_det = torch.linalg.slogdet(covariance)[1]
    return 0.5 * (torch.trace(covariance) + mean @ mean - codes.shape[1] - log_det).item()


def code_statistics(codes):
    """How far the aggregate codes (N, D) are from N(0, I): per-dimension mean and std, and the
    KL above."""
    return {"mean": codes.mean(dim=0).tolist(), "std": codes.std(dim=0).tolist(),
            "gaussian_kl_to_prior": gaussian_kl_to_standard(codes)}


def knn_accuracy(codes, labels, k=5, batch_size=500):
    """Leave-one-out k-nearest-neighbour accuracy of `labels` (N,) from `codes` (N, D):
    Euclidean, majority vote (ties go to the smaller label). 500 rows of distances at a time: 1.6x
    faster than 1,000 on a CPU."""
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
    """||m_a - m_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two
    feature sets (N, F): the FID's formula (Heusel et al. 2017), on our small classifier's
    features."""
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(dim=0), b.mean(dim=0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_a = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    # tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), whose argument is symmetric PSD
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mean_a - mean_b).pow(2).sum() + torch.trace(cov_a + cov_b) - 2 * cross).item()


def histogram_entropy(predicted, num_classes=10):
    """Entropy (bits) of the histogram of predicted classes: log2(10) = 3.32 when all ten are
    equally common."""
    counts = torch.bincount(predicted, minlength=num_classes).double()
    shares = counts[counts > 0] / counts.sum()
    return -(shares * shares.log2()).sum().item() + 0.0  # + 0.0: one class gives 0.0, not -0.0


@torch.inference_mode()
def classify(classifier, images, batch_size=250):
    """(N, 784) -> features (N, 128) and class probabilities (N, 10). 250 images a batch keep the
    CNN's feature maps in a CPU's caches (6x faster than 2,000, with channels-last weights)."""
    classifier.eval()
    features = torch.cat([classifier.features(batch) for batch in batches(images, batch_size)])
    return features, torch.softmax(classifier.head(features), dim=1)


def sample_quality(classifier, samples, reference_features):
    """Scores of decoded samples (N, 784): the Frechet distance of the classifier's features to
    the test set's, the share classified with confidence above 0.9, and the entropy (bits) of
    the histogram of predicted classes."""
    features, probabilities = classify(classifier, samples)
    confidence, predicted = probabilities.max(dim=1)
    return {"frechet_distance": frechet_distance(features, reference_features),
            "confident_share": (confidence > 0.9).float().mean().item(),
            "class_entropy_bits": histogram_entropy(predicted)}


def train_classifier(train_images, train_labels, test_images, test_labels, *, epochs=3,
                     batch_size=128, seed=0):
    """Train the scoring CNN on the grey training images, with a progress bar; return it and
    its test accuracy."""
    torch.manual_seed(seed)
    device = train_images.device
    classifier = DigitClassifier().to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    shuffle = torch.Generator(device=device).manual_seed(seed)
    train_labels = train_labels.to(device)
    classifier.train()
    steps = epochs * math.ceil(len(train_images) / batch_size)
    with tqdm(total=steps, desc="scoring classifier", leave=False, disable=None) as progress:
        for _ in range(epochs):
            order = torch.randperm(len(train_images), generator=shuffle, device=device)
            for indices in batches(order, batch_size):
                loss = F.cross_entropy(classifier(train_images[indices]), train_labels[indices])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.update()
    _, probabilities = classify(classifier, test_images)
    accuracy = (probabilities.argmax(dim=1).cpu() == test_labels.cpu()).float().mean().item()
    return classifier, accuracy


def load_classifier(path, device):
    """The cached scoring classifier at `path`, and its test accuracy."""
    checkpoint = load_checkpoint(path, fix="delete it and it is retrained")
    classifier = DigitClassifier()
    try:
        classifier.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise ProjectError(f"{path} does not hold this project's classifier; delete it and it is "
                           "retrained") from None
    return classifier.to(device), checkpoint["test_accuracy"]


def save_classifier(path, classifier, accuracy):
    save_checkpoint(path, {"config": {"kind": "classifier"}, "model": classifier.state_dict(),
                           "history": [], "test_accuracy": accuracy})


# ---------------------------------------------------------------------------------------- figures
# Figures take dicts keyed by display names ({"VAE": ..., "AE": ...}): one model or both alike.

def grid_image(images, nrow):
    """(N, 1, 28, 28) in [0, 1] -> one (H, W) array of the tiles, `nrow` to a row, between grey
    lines 2 pixels wide (torchvision's make_grid, without importing torchvision: a second)."""
    tiles = images.float().cpu().reshape(-1, IMAGE_SIDE, IMAGE_SIDE).numpy()
    columns, step = min(nrow, len(tiles)), IMAGE_SIDE + 2
    rows = math.ceil(len(tiles) / columns)
    grid = np.full((rows * step + 2, columns * step + 2), 0.5, dtype=np.float32)
    for index, tile in enumerate(tiles):
        top, left = (2 + step * position for position in divmod(index, columns))
        grid[top:top + IMAGE_SIDE, left:left + IMAGE_SIDE] = tile
    return grid


def show(ax, image, title=None):
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=11)


def plot_generation(samplers, path, *, n_side=8, seed=0):
    """samplers: {"VAE, z ~ N(0, I)": (model, Gaussian), ...}. Decode codes drawn from each: the
    VAE was trained for its prior, the AE was not; a Gaussian fitted to its codes is its chance."""
    figure = Figure(figsize=(4.2 * len(samplers) + 1.2, 4.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(samplers)))
    for ax, (label, (model, gaussian)) in zip(axes, samplers.items()):
        images = decode_images(model, gaussian.sample(n_side * n_side, seed))
        show(ax, grid_image(images, n_side), label.replace("Gaussian fitted", "\nGaussian fitted"))
    figure.suptitle(f"{n_side * n_side} decoded samples per sampler (the same noise for each)",
                    fontsize=12)
    save_figure(figure, path)


def plot_manifold(model, posterior_mean_variance, path, *, n_side=20):
    """The classic 20x20 grid: decode z over the two latent dimensions whose posterior means
    vary most over the test set (all of z when it is 2-D; one row when it is 1-D), at the 5% to
    95% quantiles of N(0, 1), with every other dimension at 0."""
    dims = torch.tensor(posterior_mean_variance).topk(min(2, model.latent_dim)).indices.tolist()
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n_side))
    device = next(model.parameters()).device
    z = torch.zeros(n_side if len(dims) == 2 else 1, n_side, model.latent_dim, device=device)
    z[:, :, dims[0]] = quantiles[None, :].to(device)  # columns: left to right = low to high
    if len(dims) == 2:
        z[:, :, dims[1]] = quantiles.flip(0)[:, None].to(device)  # rows: top to bottom = high->low
    figure = Figure(figsize=(8, 8.4) if len(dims) == 2 else (8, 1.6), layout="constrained")
    ax = figure.subplots()
    show(ax, grid_image(decode_images(model, z.reshape(-1, model.latent_dim)), n_side))
    if model.latent_dim <= 2:
        title = f"VAE with a {model.latent_dim}-D latent space: decoded grid over z"
    else:
        title = (f"VAE: decoded grid over latent dimensions {dims[0]} (across) and {dims[1]} "
                 f"(down), the two most active of {model.latent_dim};\nthe other dimensions at 0; "
                 "N(0, 1) quantiles 5% to 95%")
    ax.set_title(title, fontsize=12 if model.latent_dim <= 2 else 11)
    save_figure(figure, path)


def pick_pairs(labels, class_pairs):
    """The first test index of each class in each pair; else consecutive indices."""
    pairs = []
    for k, (a, b) in enumerate(class_pairs):
        index_a, index_b = (labels == a).nonzero(), (labels == b).nonzero()
        found = len(index_a) and len(index_b)
        pairs.append((int(index_a[0]), int(index_b[0])) if found else (2 * k, 2 * k + 1))
    return pairs


def plot_interpolation(models, codes, images, labels, dataset, path, *, steps=10):
    """Decode a straight line between the codes (VAE: posterior means) of two real test images."""
    pairs = pick_pairs(labels, dataset.interpolation_pairs)
    rows = [(name, model, pair) for pair in pairs for name, model in models.items()]
    figure = Figure(figsize=(12, 1.25 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), 3, width_ratios=[1, steps, 1], squeeze=False)
    for row, (name, model, (a, b)) in enumerate(rows):
        ends = codes[name][[a, b]]  # (2, latent_dim)
        t = torch.linspace(0, 1, steps, device=ends.device)[:, None]  # (steps, 1)
        path_images = decode_images(model, (1 - t) * ends[0] + t * ends[1])  # (steps, 1, 28, 28)
        real = images[[a, b]].reshape(2, 1, IMAGE_SIDE, IMAGE_SIDE)
        show(axes[row, 0], grid_image(real[:1], 1), dataset.classes[labels[a]])
        show(axes[row, 1], grid_image(path_images, steps),
             "decoded path, z = (1-t) z_a + t z_b" if row == 0 else None)
        show(axes[row, 2], grid_image(real[1:], 1), dataset.classes[labels[b]])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=13)
    figure.suptitle(f"Interpolation between two real {dataset.title} test images in each model's "
                    "latent space", fontsize=12)
    save_figure(figure, path)


def plot_reconstruction(models, codes, images, dataset, path, *, count=16):
    """The first `count` test images and each model's reconstruction: its decoded code (VAE:
    the posterior mean)."""
    rows = [("real", images[:count].reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE))]
    rows += [(name, decode_images(model, codes[name][:count])) for name, model in models.items()]
    figure = Figure(figsize=(12, 1.0 * len(rows) + 0.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(len(rows), 1))
    for ax, (name, row_images) in zip(axes, rows):
        show(ax, grid_image(row_images, count))
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=13)
    figure.suptitle(f"{dataset.title} test images and their reconstructions", fontsize=12)
    save_figure(figure, path)


def principal_axes(codes):
    """(N, D) -> (D, 2) orthonormal: the top two principal axes of the codes (z's own axes when
    D <= 2), each signed so that its largest component is positive, so that the latent scatter
    and the GIF show one orientation."""
    if codes.shape[1] <= 2:  # a 1-D latent space: its points on the first axis
        return torch.eye(codes.shape[1], 2, dtype=codes.dtype, device=codes.device)
    _, _, v = torch.linalg.svd(codes - codes.mean(dim=0), full_matrices=False)  # v's rows: axes
    axes = v[:2].T
    return axes * torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))


def axis_names(latent_dim):
    names = {1: ("z[0]", "(a 1-D latent space)"), 2: ("z[0]", "z[1]")}
    return names.get(latent_dim, ("principal axis 1", "principal axis 2"))


def draw_codes(ax, points, labels, *, title, axis_labels):
    """Scatter 2-D points coloured by class, with the N(0, I) circles at 1, 2 and 3 standard
    deviations; returns the scatter."""
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5,
                         s=6, linewidths=0, alpha=0.6, rasterized=True)  # no edges: 2x faster
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


def plot_latent_scatter(codes, axes_of, labels, dataset, path):
    """The test set's codes (VAE: posterior means) on their principal axes `axes_of[name]`,
    coloured by class, with circles at 1, 2 and 3 sd of N(0, I). The projection is orthonormal
    and not centred, so N(0, I) still looks like N(0, I)."""
    figure = Figure(figsize=(5.6 * len(codes) + 1.6, 5.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(codes)))
    labels = labels.cpu().numpy()
    for ax, (name, model_codes) in zip(axes, codes.items()):
        # NumPy: matplotlib reads a tensor element by element (0.15 s for the figure)
        points = (model_codes.float() @ axes_of[name]).cpu().numpy()
        scatter = draw_codes(ax, points, labels, axis_labels=axis_names(model_codes.shape[1]),
                             title=f"{name}: {model_codes.shape[1]}-D codes of the test set")
        ax.set_aspect("equal", adjustable="datalim")
    class_colorbar(figure, scatter, axes, dataset)
    figure.suptitle(f"Latent codes of {dataset.title} test images (VAE: posterior means) against "
                    "the N(0, I) prior", fontsize=12)
    save_figure(figure, path)


def write_latent_evolution(histories, axes_of, labels, dataset, path, *, seconds_per_frame=0.25):
    """Animate the test codes each history recorded (history[i]["codes"]: (n, D) float16) as a
    GIF, one frame per recorded epoch, on the latent scatter's principal axes `axes_of`. The
    figure is drawn once; each frame redraws only the points, the circles and the title over it
    (6x faster than a figure per frame) and pastes the legends back."""
    from PIL import Image  # Pillow: installed with matplotlib

    recorded = [{r["epoch"] for r in history if "codes" in r} for history in histories.values()]
    epochs = sorted(set.intersection(*recorded))
    if not epochs:
        return
    points = {name: {r["epoch"]: (r["codes"].float() @ axes_of[name].float().cpu()).numpy()
                     for r in history if "codes" in r} for name, history in histories.items()}
    latent_dims = {name: len(axes) for name, axes in axes_of.items()}
    figure, canvas, scatters, title = evolution_figure(points, latent_dims, epochs[-1],
                                                       labels.cpu().numpy(), dataset)
    background = canvas.copy_from_bbox(figure.bbox)
    # the legends' pixels, pasted over each frame in microseconds (drawn: 3 ms each)
    legends = [canvas.copy_from_bbox(scatter.axes.get_legend().get_window_extent())
               for scatter in scatters.values()]
    frames, palette = [], None
    for epoch in epochs:
        canvas.restore_region(background)
        for name, scatter in scatters.items():
            scatter.set_offsets(points[name][epoch])
            for artist in [scatter, *scatter.axes.lines]:
                scatter.axes.draw_artist(artist)  # the points, then the circles over them
        for legend in legends:
            canvas.restore_region(legend)
        title.set_text(f"{dataset.title} test codes after epoch {epoch}")
        figure.draw_artist(title)
        frame = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
        palette = palette or frame.quantize(colors=64)  # one palette for all: 15x faster
        frames.append(frame.quantize(palette=palette, dither=Image.Dither.NONE))
    durations = [int(1000 * seconds_per_frame)] * (len(frames) - 1) + [2000]  # hold the last
    write_atomically(path, lambda temporary: frames[0].save(
        temporary, format="GIF", save_all=True, append_images=frames[1:], duration=durations,
        loop=0))


def evolution_figure(points, latent_dims, last_epoch, labels, dataset):
    """The GIF's figure, drawn once without its points and title: (figure, canvas, {name:
    scatter}, title). Each panel's limits fit the last epoch's points."""
    figure = Figure(figsize=(4.6 * len(points) + 1.6, 4.8), dpi=80, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(1, len(points)))
    scatters = {}
    for ax, (name, by_epoch) in zip(axes, points.items()):
        last = by_epoch[last_epoch]
        scatters[name] = draw_codes(ax, last, labels, title=name,
                                    axis_labels=axis_names(latent_dims[name]))
        limit = 1.15 * max(3.5, float(np.quantile(np.abs(last), 0.998)))
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal")
    class_colorbar(figure, scatters[name], axes, dataset)
    title = figure.suptitle(f"{dataset.title} test codes after epoch {last_epoch}", fontsize=12)
    figure.draw_without_rendering()  # lays the figure out, with every artist in place
    figure.set_layout_engine("none")
    for artist in [*scatters.values(), title]:
        artist.set_visible(False)
    canvas.draw()
    for artist in [*scatters.values(), title]:
        artist.set_visible(True)
    return figure, canvas, scatters, title


def plot_loss_curves(histories, path):
    """histories: {"VAE": history, ...}; the train (running mean over each epoch) and test loss
    per epoch. The y axis fits the epochs after the first, whose higher loss would flatten them."""
    figure = Figure(figsize=(5.0 * len(histories), 4.0), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(histories)))
    for ax, (name, history) in zip(axes, histories.items()):
        epochs = [record["epoch"] for record in history]
        style = "o-" if len(history) <= 60 else "-"
        for split, label in (("train", "train (running mean over the epoch)"), ("test", "test")):
            ax.plot(epochs, [record[split]["loss"] for record in history], style, ms=3, label=label)
        if len(history) > 2:
            later = [r[split]["loss"] for r in history[max(1, len(history) // 50):]
                     for split in ("train", "test")]
            margin = 0.1 * (max(later) - min(later)) + 0.1
            ax.set_ylim(min(later) - margin, max(later) + margin)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss per image (nats)")
        ax.set_title(f"{name}: {'negative ELBO' if 'kl' in history[-1]['test'] else 'BCE'}",
                     fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(figure, path)


STUDY_COLUMNS = [("mse", "MSE per pixel"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"),
                 ("test_loss", "test loss (nats)"), ("test_nll_iwae", "IWAE NLL (nats)")]


def latent_study_table(study):
    """study: {"2": {"vae": {...}, "ae": {...}}, ...} -> a Markdown table, a row per size and
    model."""
    lines = ["| latent size | model | " + " | ".join(title for _, title in STUDY_COLUMNS) + " |",
             "|---|---|" + "---|" * len(STUDY_COLUMNS)]
    for size, row in study.items():
        for kind, values in row.items():
            cells = ["-" if key not in values else f"{values[key]:.4f}" if key in ("mse", "ssim")
                     else f"{values[key]:.2f}" for key, _ in STUDY_COLUMNS]
            lines.append(f"| {size} | {kind.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_row(metrics):
    """The numbers the latent-size study compares, for each model of one run."""
    row = {}
    for kind in ("vae", "ae"):
        if kind in metrics:
            row[kind] = {**metrics[kind]["reconstruction"],
                         "test_loss": metrics[kind]["test"]["loss"]}
            if "test_nll_iwae" in metrics[kind]:
                row[kind]["test_nll_iwae"] = metrics[kind]["test_nll_iwae"]["nats"]
    return row


def plot_latent_study(study, path):
    """One panel per reconstruction score, and the VAE's test negative ELBO, against the latent
    size."""
    sizes = [int(size) for size in study]
    panels = [("mse", "test MSE per pixel"), ("psnr", "test PSNR (dB)"), ("ssim", "test SSIM"),
              ("test_loss", "VAE test negative ELBO (nats)")]
    figure = Figure(figsize=(16, 3.8), layout="constrained")
    for ax, (key, title) in zip(figure.subplots(1, len(panels)), panels):
        for kind, marker in (("vae", "o-"), ("ae", "s-")):
            if key == "test_loss" and kind == "ae":
                continue  # the AE's loss is its BCE: no likelihood bound, not comparable
            points = [(size, row[kind][key]) for size, row in zip(sizes, study.values())
                      if kind in row]
            if points:
                ax.plot(*zip(*points), marker, label=kind.upper())
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.set_xlabel("latent size")
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("Latent-size study: reconstruction of the test set (decoded posterior means "
                    "/ codes)", fontsize=12)
    save_figure(figure, path)
