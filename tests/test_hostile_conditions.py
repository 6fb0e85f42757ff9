"""Never a traceback, part five: a write cut short by the file system, Ctrl-C held down, links planted in an output
folder, data sets of odd and tiny sizes, a Python API that refuses what does not fit before any work, and the way out
printed fitting the cause."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import checkpoint_files
import main
import metrics
import run_folders
import training
import utils
from conftest import FAST_SCORES, ROOT, check_error_line, make_synthetic_mnist, run_expecting_error
from models import ModelConfig, build_model

QUIET = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def flags(data_dir, out, epochs, *extra):
    return ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "checkpoints"), "--figure-dir",
            str(out / "figures"), "--epochs", str(epochs), "--hidden-dim", "16", *FAST_SCORES, *extra]


def run_script(argv, cwd, **options):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, argv)], cwd=cwd, env=QUIET,
                          capture_output=True, text=True, timeout=300, **options)


# ---------------------------------------------------------------------------------------- a write cut short

def test_a_checkpoint_cut_short_by_a_file_size_limit_is_one_line_with_the_file_systems_reason(synthetic_mnist,
                                                                                           tmp_path):
    main.main(flags(synthetic_mnist, tmp_path, 1, "--models", "vae", "--hidden-dim", "64", "--no-figures"))
    checkpoint = tmp_path / "checkpoints" / "vae.pt"
    before, size = checkpoint.read_bytes(), checkpoint.stat().st_size
    limit = size - 4096  # the new checkpoint stops part way; the first epoch's files were smaller

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    finished = run_script(flags(synthetic_mnist, tmp_path, 2, "--hidden-dim", "64", "--resume", "--no-figures"), tmp_path,
                          preexec_fn=limited)
    printed = check_error_line(finished.stderr)
    assert finished.returncode == 1 and "File too large" in printed, printed
    assert "vae.pt keeps its previous contents" in printed and checkpoint.read_bytes() == before
    assert not list(checkpoint.parent.glob("*.tmp"))


def test_a_writer_whose_own_error_hides_the_file_systems_gets_the_file_systems_reason(tmp_path):
    def serializer(file):  # as torch.save does: an OSError inside, a RuntimeError out
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    with pytest.raises(utils.ProjectError, match=r"a\.pt \(No space left on device\); nothing is written"):
        utils.write_atomically(tmp_path / "a.pt", serializer)

    def buggy(file):
        raise RuntimeError("a bug of the writer's own")
    with pytest.raises(RuntimeError, match="a bug"):  # not the file system's: not disguised as one
        utils.write_atomically(tmp_path / "a.pt", buggy)


# ------------------------------------------------------------------------------------------ a key held down

@pytest.mark.parametrize("start", ["in training", "while torch imports"])
def test_ctrl_c_held_down_ends_the_run_with_one_line(tmp_path, start):
    data_dir = make_synthetic_mnist(tmp_path / "mnist", n_train=2048, n_test=64)
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *flags(data_dir, out, 1000)], cwd=tmp_path,
                               env=QUIET, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if start == "in training":
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "vae.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    else:  # Python's own start comes first (README: its first hundredths of a second), then the imports
        time.sleep(0.6)
    for _ in range(1500):  # a key's auto-repeat: a signal every 20 ms until the process has gone
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGINT)
        time.sleep(0.02)
    _, stderr = process.communicate(timeout=60)
    printed = check_error_line(stderr)  # exactly one line, no traceback
    assert process.returncode == 130 and "stopped by SIGINT" in printed
    assert ("before the run began" in printed) == (start != "in training"), stderr


# ------------------------------------------------------------------------------- links planted in a folder

def test_no_file_is_written_through_a_link_planted_in_an_output_folder(synthetic_mnist, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("not the run's\n")
    out = tmp_path / "run"
    for folder in ("checkpoints", "figures"):
        (out / folder).mkdir(parents=True)
        (out / folder / ".lock").symlink_to(precious)
    (out / "figures" / "metrics.json").symlink_to(precious)
    (out / "checkpoints" / "vae.pt").symlink_to(tmp_path / "nowhere.pt")  # a dangling one
    main.main(flags(synthetic_mnist, out, 1, "--models", "vae"))
    assert precious.read_text() == "not the run's\n" and not (tmp_path / "nowhere.pt").exists()
    assert not (out / "figures" / "metrics.json").is_symlink() and (out / "checkpoints" / "vae.pt").is_file()
    assert json.loads((out / "figures" / "metrics.json").read_text())["vae"]["epochs"] == 1


# --------------------------------------------------------------------------------- small and odd data sets

def test_an_odd_test_set_under_2000_images_runs_with_fewer_interpolation_pairs(tmp_path, committed_classifier):
    data_dir = make_synthetic_mnist(tmp_path / "mnist", n_train=128, n_test=999)
    scores = main.main(flags(data_dir, tmp_path, 1, "--no-figures"))
    assert scores["interpolation"]["VAE"]["pairs"] == 499  # the odd image left out
    assert len(metrics.interpolation_pairs(torch.zeros(3))) == 1 and len(metrics.interpolation_pairs(torch.zeros(1))) == 0


@pytest.mark.parametrize("split, count", [("test", 0), ("train", 0), ("test", 9)])
def test_a_split_of_too_few_images_is_refused_by_the_reader_in_one_line(tmp_path, capsys, split, count):
    sizes = {"n_train": 64, "n_test": 64, f"n_{split}": count}
    data_dir = make_synthetic_mnist(tmp_path / "mnist", **sizes)
    code, printed = run_expecting_error(flags(data_dir, tmp_path, 1), capsys)
    assert code == 1 and f"holds {count} images; a split needs at least {utils.MINIMUM_IMAGES}" in printed


def test_the_smallest_accepted_sets_run_and_say_which_scores_they_skip(tmp_path, committed_classifier):
    data_dir = make_synthetic_mnist(tmp_path / "mnist", n_train=utils.MINIMUM_IMAGES, n_test=utils.MINIMUM_IMAGES)
    main.main(flags(data_dir, tmp_path, 1, "--no-figures"))
    assert json.loads((tmp_path / "figures" / "metrics.json").read_text())["vae"]["epochs"] == 1
    one = metrics.mean_and_error(torch.ones(1))
    assert one["mean"] == 1.0 and one["standard_error"] is None and "too few" in one["skipped"]
    assert metrics.mean_and_error(torch.ones(0))["mean"] is None


# --------------------------------------------------------------------------- the Python API refuses first

@pytest.fixture
def api_models(tmp_path, monkeypatch):
    """An unconditional and a conditional VAE through load_model, whose decoders must never run."""
    loaded = {}
    for condition in ("none", "label"):
        config = ModelConfig(kind="vae", latent_dim=4, hidden_dim=8, condition=condition)
        path = tmp_path / f"{condition}.pt"
        checkpoint_files.save_checkpoint(path, {"config": vars(config), "model": build_model(config).state_dict(),
                                                "history": []})
        model = checkpoint_files.load_model(path)
        monkeypatch.setattr(model, "decode", lambda *args, **kwargs: pytest.fail("work before the refusal"))
        loaded[condition] = model
    return loaded


@pytest.mark.parametrize("call, words", [
    (lambda m: m["none"].sample(4, labels=7), "labels: this model is unconditional"),
    (lambda m: m["label"].sample(4, labels=12), "labels: classes are 0-9; got 12"),
    (lambda m: m["label"].sample(4, labels=-1), "labels: classes are 0-9; got -1"),
    (lambda m: m["label"].sample(4, labels=[1, 2]), "labels: give one class 0-9 or 4 of them"),
    (lambda m: m["label"].sample(4, labels=torch.ones(3, 10)), "labels: mixes must be (10,) or (4, 10)"),
    (lambda m: m["label"].sample(4), "labels: this model is conditional"),
    (lambda m: m["label"].sample(-1, labels=3), "count: the number of images to sample"),
    (lambda m: m["none"].sample(2.5), "count: the number of images to sample"),
    (lambda m: m["none"].reconstruct(torch.rand(2, 28, 28)), "x: images as a float tensor (B, 784)"),
    (lambda m: m["none"].reconstruct(torch.zeros(2, 784, dtype=torch.uint8)), "x: images as a float tensor"),
    (lambda m: m["none"].reconstruct(torch.rand(2, 784), labels=3), "labels: this model is unconditional"),
], ids=["label-unconditional", "label-12", "label-negative", "label-count", "mix-count", "no-label", "count-negative",
        "count-float", "image-shape", "image-dtype", "reconstruct-label"])
def test_the_api_refuses_with_a_value_error_naming_the_argument_before_any_work(api_models, call, words):
    with pytest.raises(ValueError) as refused:
        call(api_models)
    assert str(refused.value).startswith(words.split(":")[0] + ":") and words in str(refused.value)


@pytest.mark.parametrize("device", ["cuda:7", "cpux", "tpu"])
def test_load_model_refuses_a_device_this_machine_lacks_before_reading_the_file(device):
    if device in utils.available_devices():
        pytest.skip(f"this machine has {device}")
    with pytest.raises(ValueError, match=r"^device: there is no device"):
        checkpoint_files.load_model("no-such-file.pt", device=device)


# ---------------------------------------------------------------------------- the way out fits the cause

def test_a_divergence_names_the_extra_terms_weight_before_the_learning_rate():
    base = {"adversarial_weight": 0.0, "perceptual_weight": 0.0}
    assert training.divergence_advice(base) == "try a lower --lr"
    assert training.divergence_advice({**base, "adversarial_weight": 1e4}) == \
        "try a lower --adversarial-weight (now 10000) or --lr"


def test_out_of_memory_in_eval_never_names_a_flag_that_eval_takes_from_the_checkpoint(synthetic_mnist, tmp_path,
                                                                                      capsys, monkeypatch):
    main.main(flags(synthetic_mnist, tmp_path, 1, "--models", "vae", "--no-figures"))

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1e12 bytes")
    monkeypatch.setattr(metrics, "evaluate_loss", no_memory)
    code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, 1, "--eval"), capsys)
    assert code == 1 and printed.startswith("error: out of memory while scoring the losses")
    assert "--hidden-dim" not in printed and "--batch-size" not in printed and "free memory" in printed
    args = main.parse_args(["--eval", "--nll-samples", "5000"])
    assert run_folders.memory_advice(args, "computing the IWAE bound") == "lower --nll-samples (now 5000)"
