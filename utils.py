"""Plumbing, never a model or a score: the IDX files and datasets, devices, files written whole
(JSON, figures, and through checkpoint_files.py the checkpoints) in locked folders, threads, signals,
the table of phases, and ProjectError, the one-line error a user can fix. Imports nothing of this
project; nothing runs on import."""
import contextlib
import dataclasses
import errno
import functools
import gzip
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
import zlib
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

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
MINIMUM_IMAGES = 10  # in each split: fewer are refused when read
BINARIZATION_SEEDS = {"train": 1, "test": 2}  # fixed: every run with --binarize sees one test set


@dataclasses.dataclass(frozen=True)
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


def path_problem(path):
    """Why the file system would refuse `path` by its names alone (a name longer than it
    allows), or None."""
    path = Path(path)
    existing = next((folder for folder in path.parents if exists(folder)), Path("."))
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # AttributeError: Windows has no pathconf
        limit = 255
    for name in path.parts:
        size = len(os.fsencode(name))
        if size > limit:
            return (f"the name {name[:24]}... is {size} bytes long, and this file system takes "
                    f"at most {limit}; pick a shorter one")
    return None


def is_file(path):
    """Whether `path` names a file; one line where the file system refuses the name itself (a
    name too long for it, say)."""
    try:
        return Path(path).is_file()
    except OSError as error:
        raise ProjectError(f"cannot use the path {path} ({error.strerror or error}); pick a "
                           "shorter or another name") from None


def find_idx_file(folder, name, dataset="mnist"):
    """`name` or `name.gz` in `folder` or in torchvision's folder/<MNIST...>/raw, else None."""
    for directory in (Path(folder), Path(folder) / DATASETS[dataset].torchvision_class / "raw"):
        for candidate in (directory / name, directory / f"{name}.gz"):
            if is_file(candidate):
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
            raise ProjectError(f"{folder}/ holds none of the four {info.title} IDX files and "
                               f"could not download {info.title} into {folder}/ "
                               f"({error_reason(error, 160)}); offline, pass --data-dir FOLDER "
                               "holding train-images-idx3-ubyte[.gz] and the other three") from None
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
        if len(images) < MINIMUM_IMAGES:
            raise ProjectError(f"{found[images_name]} holds {counted(len(images), 'image')}; "
                               f"a split needs at least {MINIMUM_IMAGES} (the codes' k-NN accuracy "
                               "compares each test image with its 5 nearest): use the full files")
        if len(images) != len(labels):
            raise ProjectError(f"{found[images_name]} holds {len(images)} images but "
                               f"{found[labels_name]} holds {len(labels)} labels; the two files "
                               "must come from the same release")
        splits[split] = (torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))
    return splits


def load_data(data_dir, dataset, device):
    """{split: (images, labels)}: images (N, 784) in [0, 1] on `device`, labels (N,)."""
    splits = load_dataset(data_dir, dataset)
    data = {split: (to_model_input(images, device), labels)
            for split, (images, labels) in splits.items()}
    print(f"device {device}: {len(data['train'][0])} training and {len(data['test'][0])} test "
          f"images of {DATASETS[dataset].title} from {data_dir}/")
    return data


def to_model_input(images, device):
    """uint8 (N, 28, 28) -> float32 (N, 784) in [0, 1] on `device`, once for the whole set."""
    return images.to(device).reshape(len(images), -1).float().div_(255.0)


def binarized(images, binarize, split):
    """The targets a model with this --binarize trains or is tested on: the grey pixels (none),
    one fixed Bernoulli sample of each pixel (static, and the test set under dynamic), or for
    dynamic training the grey images, which train_epoch samples afresh for each batch."""
    if binarize == "none" or (binarize == "dynamic" and split == "train"):
        return images
    generator = torch.Generator().manual_seed(BINARIZATION_SEEDS[split])  # the same on every device
    return torch.bernoulli(images.cpu(), generator=generator).to(images.device)


def available_devices():
    devices = ["cpu"] + [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return devices + ["mps"] if torch.backends.mps.is_available() else devices


def pick_device(name):
    """The torch.device `name` ("auto": CUDA, then Apple MPS, then the CPU) if this machine has
    it; any other name is an error that lists the devices here. Call it before any other torch
    work: it sets the CPU's mode for the threads torch starts (and nothing of a GPU's)."""
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
    # Numbers below 1e-38 (denormals) take a CPU's slow path, and Adam's moments for pixels that
    # are always blank decay into them by epoch 2: flushed to zero, epochs run 10-15% faster.
    # torch's threads inherit the mode from the thread that starts them, hence "before".
    torch.set_flush_denormal(True)
    return device


def use_device(device):
    """Compute on `device` as on the CPU: float32 products in float32, without the TF32 that
    cuDNN's convolutions use by default on a recent NVIDIA GPU (its 10-bit products would move
    the scores by more than float32 rounding), with the chosen GPU as the current one."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.cuda.set_device(device.index if device.index is not None else
                              torch.cuda.current_device())  # "cuda" names no index


@contextlib.contextmanager
def torch_settings_kept():
    """torch's process-wide settings that a run changes, as they were once it returns, for a
    learner's shell or a test that goes on after main.main: the global random state (a new
    model's weights are drawn from --seed), the thread count, TF32. Not flush-to-zero, which a
    run turns on (pick_device): torch can neither read it back nor reset the threads that took
    it, so it stays on for the process."""
    random_state, threads = torch.get_rng_state(), torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(random_state)
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def make_optimizer(module, lr, device, **settings):
    """Adam over `module`'s parameters, fused where the device has it: one kernel for all the
    parameters (measured: 0.4 against 1.1 ms a step on a CPU)."""
    return torch.optim.Adam(module.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"),
                            **settings)


def check_bf16(device):
    """Fail in one line where bfloat16 autocast cannot train on `device`; say so where it would
    be slow."""
    if device.type not in ("cpu", "cuda"):
        raise ProjectError(f"--precision bf16 is for CPUs and CUDA GPUs, not {device.type}; use "
                           "--precision fp32")
    if device.type == "cuda":
        with torch.cuda.device(device):  # the chosen GPU, not the current one
            if not torch.cuda.is_bf16_supported(including_emulation=True):
                raise ProjectError(f"{device} has no bfloat16 support; train with --precision "
                                   "fp32")
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                print(f"note: {device} ({torch.cuda.get_device_name(device)}) emulates bfloat16, "
                      "so --precision bf16 will likely train slower than fp32")
        return
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    native = capabilities.get("avx512_bf16") or capabilities.get("amx_bf16")
    if capabilities.get("architecture") == "x86_64" and not native:
        print("note: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so --precision "
              "bf16 emulates them and will likely train slower than fp32")


def counted(number, noun):
    """"1 epoch", "30 epochs": a count and its noun, in the singular or the plural."""
    return f"{number} {noun}" + ("" if number == 1 else "s")


def first_line(error, limit):
    """The start of an exception's message, for a one-line error; its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def error_reason(error, limit):
    """Why `error` happened, in one line: its first line, and where that only announces a list
    ("Error downloading x.gz:"), the list's last line too (torchvision's last mirror's error)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[-1]}"[:limit]
    return first_line(error, limit)


DEVICE_FAILURES = (  # what a GPU's runtime says of its own failures, lower-cased
    "not currently implemented for the mps device", "cuda error", "cudnn_status", "cublas_status",
    "cuda driver", "no cuda gpus", "no cuda-capable", "mps backend failed", "device lost",
    "launch failure", "ecc error")
PROGRAM_BUGS = (  # ... and of a program's: a tensor on the wrong device, a kernel's bad index
    "expected all tensors to be on the same device", "placeholder storage has not been allocated",
    "device-side assert", "illegal memory access")


def is_device_failure(error):
    """Whether `error` is a GPU's own failure, which the CPU would not have: an operation its
    backend lacks (Apple's MPS raises NotImplementedError), a lost device, a failing driver or
    library. A tensor on the wrong device or a bad index is the program's bug, not the device's."""
    text = str(error).lower()
    if any(phrase in text for phrase in PROGRAM_BUGS):
        return False
    return isinstance(error, NotImplementedError) or any(phrase in text
                                                         for phrase in DEVICE_FAILURES)


def write_error_report(error, folder, phase, device):
    """Write what a bug report needs (the traceback, the command, the versions of Python, torch
    and the system, the device, the phase) to FOLDER/error-report.txt, or where that cannot be
    written to the system's temporary folder; return the path written."""
    import platform
    import traceback

    lines = ["An unexpected error stopped a run of this program.",
             f"command: {' '.join(sys.argv) if sys.argv and sys.argv[0] else '(from Python)'}",
             f"phase: {phase}", f"device: {device}" + (
                 f" ({torch.cuda.get_device_name(device)})"
                 if device.type == "cuda" and torch.cuda.is_available() else ""),
             f"python {platform.python_version()}, torch {torch.__version__}, "
             f"{platform.platform()}, {torch.get_num_threads()} threads", "",
             *traceback.format_exception(type(error), error, error.__traceback__)]
    text = "\n".join(line.rstrip("\n") for line in lines) + "\n"
    for where in (Path(folder), Path(tempfile.gettempdir())):
        with contextlib.suppress(ProjectError, OSError):
            write_atomically(where / "error-report.txt", lambda file: file.write(text.encode()))
            return where / "error-report.txt"
    return "(no report: nowhere could be written)"


def is_out_of_memory(error):
    """Whether `error` is a failed allocation: CUDA's OutOfMemoryError, or the CPU allocator's."""
    text = str(error)
    return (isinstance(error, (MemoryError, torch.OutOfMemoryError))
            or "can't allocate memory" in text or "out of memory" in text)


# ---------------------------------------------------------- files: written whole, in locked folders

def write_atomically(path, write):
    """Call write(file), `file` a new binary file of its own beside `path`, then rename it over
    `path`: a crash, kill -9 or full disk never leaves half a file, a failed write leaves the
    previous file as it was, and a link planted at `path` is replaced, never written through (the
    new file is created exclusively, and the rename replaces the link itself). Where the file
    system refuses (a full disk, a file-size limit), one line with its reason, however the writer
    (torch.save, matplotlib, Pillow) wrapped it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "xb") as file:  # a file, not a path: the writer's errors are OSError
            write(file)
        os.replace(temporary, path)
    except Exception as error:
        refusal = os_error_in(error)
        if refusal is None:
            raise
        kept = f"{path.name} keeps its previous contents" if exists(path) else "nothing is written"
        raise ProjectError(f"cannot write {path} ({refusal.strerror or refusal}); {kept}") from None
    finally:
        with contextlib.suppress(OSError):  # a read-only disk: the error above is the one to say
            temporary.unlink(missing_ok=True)


def os_error_in(error):
    """The file system's OSError that `error` is or arose from (torch.save raises a RuntimeError,
    "unexpected pos", while handling the OSError of a write cut short), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def exists(path):
    """Path.exists(), False where the file system refuses the name itself."""
    with contextlib.suppress(OSError):
        return Path(path).exists()
    return False


def load_json(path):
    """A JSON file read whole; one line naming it where it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ProjectError(f"{path} cannot be read ({first_line(error, 80)}); write it with "
                           "python main.py --eval and that run's --figure-dir") from None


def save_json(path, data):
    """Write `data` as JSON, which has no NaN or infinity: one line naming the number where
    it holds one, and nothing written."""
    place = non_finite_place(data)
    if place:
        raise ProjectError(f"{path}: {place}; nothing is written (a model whose weights overflow? "
                           "retrain it with a lower --lr)")
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(path, lambda file: file.write(text.encode()))


def non_finite_place(data, where=""):
    """Where nested dicts and lists hold a NaN or infinite float ("vae.latent.kl is inf"), or
    None."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"{where or 'the value'} is {data}"
    items = data.items() if isinstance(data, dict) else enumerate(data) \
        if isinstance(data, (list, tuple)) else []
    for key, value in items:
        place = non_finite_place(value, f"{where}.{key}" if where else str(key))
        if place:
            return place
    return None


def save_figure(figure, path):
    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=100))


def open_own_file(path):
    """`path` opened to read and write, created if need be, never through a link: a symbolic link
    planted there is removed (the file it points to untouched) and a file of our own made."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            return os.fdopen(os.open(path, flags, 0o644), "r+")
        except OSError as error:
            if error.errno != errno.ELOOP:  # ELOOP: O_NOFOLLOW met a link
                raise
        os.unlink(path)


class FolderLock:
    """Holds FOLDER/.lock while a run writes into FOLDER, so that a second run there stops at
    once, naming the first; a run that ends removes it. The kernel drops the lock when its holder
    exits, however it dies (kill -9 too), so a folder left by a dead run is simply taken over."""

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"

    def __enter__(self):
        while not self.take():  # the run that held it removed the file meanwhile: try again
            pass
        try:  # the holder's process number, for the message of a second run; unbuffered, so
            os.ftruncate(self.file.fileno(), 0)  # that a full disk fails here, and only here
            os.write(self.file.fileno(), f"{os.getpid()}\n".encode())
        except OSError as error:  # a full disk
            self.release()
            raise ProjectError(f"cannot write to {self.path.parent}/ ({error.strerror}); free "
                               "some space there or pick another folder") from None
        return self

    def take(self):
        """Open and lock FOLDER/.lock; False where it is no longer the file at that path."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open_own_file(self.path)
        except OSError as error:
            raise ProjectError(f"cannot write to {self.path.parent}/ ({error.strerror}); pick "
                               "another folder or fix its permissions") from None
        if fcntl is None:
            return True
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise ProjectError(f"{self.path.parent}/ is in use by another run of main.py "
                               f"(process {holder}); wait for it to end or pick another "
                               "folder") from None
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino:
                return True
        self.file.close()
        return False

    def release(self):
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still held: a run that opens it next finds it gone
        self.file.close()  # releases the lock

    def __exit__(self, *exc_info):
        self.release()


# ------------------------------------------------------------------- threads, signals and phases

class GuardedStream:
    """stdout or stderr of main.py run as a script: a write that fails (a full disk under it, a
    terminal gone) is remembered and the stream pointed at os.devnull, so that the run goes on
    and says so at its end; a reader that closed its pipe (`| head`) still raises BrokenPipeError,
    which ends the run."""

    def __init__(self, stream, failure=None):
        self.stream, self.failure = stream, failure

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as error:  # ValueError: a file closed under it
            self.fail(error)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as error:
            self.fail(error)

    def fail(self, error):
        self.failure = self.failure or (error.strerror if isinstance(error, OSError) else None) \
            or first_line(error, 60)
        with contextlib.suppress(OSError, ValueError):  # what is buffered then goes nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def script_streams():
    """stdout and stderr for main.py run as a script: stdout line-buffered (each line when printed,
    into a pipe or tee too), any path printable (a name that is not UTF-8 comes out escaped), a
    closed or failing stream never a traceback. A closed pipe ends the run with 141; output lost
    otherwise is said in one line at the end, exit code 1, unless the run ended with its own."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:  # closed before the run began (`>&-`)
            setattr(sys, name, GuardedStream(open(os.devnull, "w"), failure="it is closed"))
            continue
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(line_buffering=name == "stdout", errors="backslashreplace")
        setattr(sys, name, GuardedStream(stream))
    code = 0
    try:
        yield
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at Python's exit
    except BrokenPipeError:  # a reader closed stdout or stderr (`python main.py | head -1`)
        silence_closed_streams()
        code = 141  # 128 + SIGPIPE: what a shell reports for a process whose pipe closed
    except SystemExit as exited:
        code = exited.code
    if sys.stdout.failure and not code:
        print(f"error: could not write to standard output ({sys.stdout.failure}): what the run "
              "printed there is lost; the files it writes are written", file=sys.stderr)
        code = 1
    if code:
        sys.exit(code)


def silence_closed_streams():
    """Point stdout and stderr at os.devnull, so that Python's exit writes nothing more into a
    closed pipe (where it would print a traceback of its own)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(devnull, stream.fileno())


def side_by_side(jobs, stop=None, device=None):
    """Run the callables `jobs` ({name: job}) at once, each in a thread; return {name: result}. On
    a CPU each thread gets its share of torch's threads; on a GPU its own CUDA stream, so that the
    kernels of one run while the other's are launched. If one fails, `stop` asks the others to
    end after their current step, and its error is raised."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        jobs = {name: functools.partial(on_own_stream, job, device) for name, job in jobs.items()}
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, threads // len(jobs)))
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = {name: pool.submit(job) for name, job in jobs.items()}
            done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
            failed = [future for future in done if future.exception() is not None]
            if failed:
                if stop is not None:
                    stop.request("the other model's failure")
                raise failed[0].exception()
            return {name: future.result() for name, future in futures.items()}
    finally:
        torch.set_num_threads(threads)


def on_own_stream(job, device):
    """job(), its kernels queued on a CUDA stream of its own once the current stream's (the
    data's) are done; returns when they have run."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    try:
        with torch.cuda.stream(stream):
            return job()
    finally:  # however the job ends (a failure, a stop): no kernel of it is left queued on
        stream.synchronize()  # memory the caching allocator may hand out again


def wait_for_queued_work(device):
    """Wait for the work queued on `device` to finish, to time it: on CUDA this thread's current
    stream (another thread's stream runs on), on MPS all of it; a CPU has no queue."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()



class Stopped(BaseException):
    """SIGINT or SIGTERM ended the run. A BaseException, as KeyboardInterrupt is: no `except
    Exception` that copes with a failure (a download's, a file's) may swallow the user's stop."""

    def __init__(self, signal_name):
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM into Stopped. Inside polled() (the training loops) a
    signal only records its name, which the loop reads after each step, so that no step or
    checkpoint is cut in half; elsewhere the first signal raises Stopped at once (every file is
    written whole or not at all)."""

    def __init__(self, *, afterwards=None):
        self.reason, self.polling, self.said = None, False, False  # reason: a signal's name,
        # or "the other model's failure" when a model training beside it failed
        self.afterwards = afterwards  # the handler left behind (None: the one found on entry)

    def __enter__(self):
        self.previous = {number: signal.signal(number, self.handle)
                         for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler if self.afterwards is None else self.afterwards)

    def handle(self, number, frame):
        first = self.reason is None
        self.request(signal.Signals(number).name)
        if first and not self.polling and not self.said:
            raise Stopped(self.reason)

    def saying_the_end(self):
        """The run is printing how it ended: from now on a signal (a key held down) is only
        recorded, so that no second line follows."""
        self.said = True

    def request(self, reason):
        self.reason = self.reason or reason

    @contextlib.contextmanager
    def polled(self):
        self.polling = True
        try:
            yield
        finally:
            self.polling = False


class Phases:
    """Wall-clock seconds per phase, for the table printed at the end of a run; `current` names
    the phase under way, for the line a signal or an out-of-memory error ends the run with."""

    def __init__(self, startup_seconds=0.0):
        self.started, self.current = time.perf_counter(), "starting"
        self.startup_seconds = startup_seconds  # Python and the imports, before this object
        self.seconds = {"start-up (Python and its imports)": startup_seconds}

    @contextlib.contextmanager
    def __call__(self, name):
        outer, self.current = self.current, name
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self.current = outer  # not reached when the phase raised: `current` then names it

    def table(self):
        rows = [f"  {name:<36} {seconds:6.1f} s" for name, seconds in self.seconds.items()]
        total = self.startup_seconds + time.perf_counter() - self.started
        return "\n".join(["time by phase:", *rows, f"  {'total':<36} {total:6.1f} s"])
