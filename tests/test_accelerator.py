"""The accelerator: an NVIDIA GPU (CUDA) or a Mac's (MPS), whichever this machine has; these tests skip elsewhere, so
that the suite stays green on CPUs. tests/device_check.sh runs them, then times the default run, --eval and the
benchmark there. A short run, --eval and --resume on the device; --eval of the committed checkpoints against
figures/metrics.json (the CPU's numbers); and every arch, the conditional model and the IWAE objective trained side
by side, evaluated and resumed under a stand-in for MPS, which has no float64: any float64 tensor off the CPU, and
any random generator made on the device for scoring, is an error."""
import json
import math
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import checkpoint_files
import main
from conftest import FAST_SCORES, REAL_MNIST, ROOT, make_synthetic_mnist

ACCELERATOR = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None
pytestmark = pytest.mark.skipif(ACCELERATOR is None, reason="no CUDA or MPS device here")
NOT_SCORES = {"trained_on", "threads", "notes", "file"}
COUNTED = ("share", "accuracy", "class_changes")  # shares of samples, pairs or images: one may cross a threshold


def close(ours, theirs, where):
    """Float32 rounding: 1e-3 relative; a share or an accuracy may also move by a sample or two."""
    counted = any(word in where for word in COUNTED)
    return math.isclose(ours, theirs, rel_tol=1e-3, abs_tol=2e-3 if counted else 1e-6)


def flags(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "checkpoints"), "--figure-dir",
            str(out / "figures"), "--device", ACCELERATOR, *FAST_SCORES, *extra]


def test_a_short_run_evaluates_and_resumes_on_the_device_as_a_straight_run_trains(tmp_path, committed_classifier):
    trained = main.main(flags(REAL_MNIST, tmp_path / "resumed", "--epochs", "1"))
    assert trained["vae"]["trained_on"].startswith(ACCELERATOR) and trained["vae"]["test"]["loss"] < 140
    assert trained["vae"]["test_nll_iwae"]["nats"] < trained["vae"]["test"]["loss"]
    evaluated = main.main(flags(REAL_MNIST, tmp_path / "resumed", "--eval"))
    for kind in ("vae", "ae"):
        assert evaluated[kind]["test"] == pytest.approx(trained[kind]["test"], rel=1e-5)
    resumed = main.main(flags(REAL_MNIST, tmp_path / "resumed", "--epochs", "2", "--resume", "--no-figures"))
    straight = main.main(flags(REAL_MNIST, tmp_path / "straight", "--epochs", "2", "--no-figures"))
    for kind in ("vae", "ae"):
        ours, theirs = (checkpoint_files.load_checkpoint(tmp_path / run / "checkpoints" / f"{kind}.pt")
                        for run in ("resumed", "straight"))
        assert [record["epoch"] for record in ours["history"]] == [1, 2] and ours["device"].startswith(ACCELERATOR)
        for name, weight in theirs["model"].items():  # the same order and draws: the same weights, to rounding
            assert torch.allclose(ours["model"][name], weight, rtol=1e-4, atol=1e-6), (kind, name)
        assert resumed[kind]["test"] == pytest.approx(straight[kind]["test"], rel=1e-4)


def differences(ours, theirs, where=""):
    """[(relative difference, where)] of every number two metrics.json hold, timings aside."""
    if isinstance(theirs, dict):
        return [found for key in theirs if key not in NOT_SCORES
                for found in differences(ours[key], theirs[key], f"{where}.{key}".lstrip("."))]
    if isinstance(theirs, list):
        return [found for k, item in enumerate(theirs) for found in differences(ours[k], item, f"{where}[{k}]")]
    if isinstance(theirs, (int, float)) and not isinstance(theirs, bool):  # counts too: active units, pairs
        return [(abs(ours - theirs) / max(abs(theirs), 1e-12), where, close(ours, theirs, where))]
    return []


def test_eval_of_the_committed_checkpoints_gives_the_cpus_numbers(tmp_path, committed_classifier):
    (tmp_path / "figures").mkdir()
    shutil.copy(ROOT / "figures" / "metrics.json", tmp_path / "figures")  # its IWAE sample count
    main.main(["--eval", "--data-dir", str(REAL_MNIST), "--checkpoint-dir", str(ROOT / "checkpoints"),
               "--figure-dir", str(tmp_path / "figures"), "--device", ACCELERATOR])
    ours = json.loads((tmp_path / "figures" / "metrics.json").read_text())
    found = differences(ours, json.loads((ROOT / "figures" / "metrics.json").read_text()))
    assert len(found) > 100 and all(fits for _, _, fits in found), [item for item in found if not item[2]]


class NotAsOnAMac(AssertionError):
    pass


class AsOnAMac(TorchDispatchMode):
    """Apple's MPS, as far as this program's portability goes: an operation that reads or makes a float64 tensor
    anywhere but on the CPU is an error (MPS has no float64), and on CUDA so is a random draw from a generator on the
    device in this thread, where scoring runs (it draws on the CPU, so that every device scores the same samples; on a
    Mac the training runs here too, with its own generators on the device, which MPS has)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        generator = (kwargs or {}).get("generator")
        if ACCELERATOR == "cuda" and generator is not None and generator.device.type != "cpu":
            raise NotAsOnAMac(f"{func} draws from a generator on {generator.device}")
        result = func(*args, **(kwargs or {}))
        for tensor in tree_leaves((args, kwargs, result)):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64 and tensor.device.type != "cpu":
                raise NotAsOnAMac(f"{func} in float64 on {tensor.device}")
        return result


@pytest.mark.parametrize("options", [
    ["--arch", "mlp"], ["--arch", "conv"], ["--arch", "resnet"], ["--condition", "label"],
    ["--objective", "iwae", "--k", "3", "--binarize", "dynamic"]], ids=["mlp", "conv", "resnet", "conditional", "iwae"])
def test_every_model_trains_side_by_side_evaluates_and_resumes_as_on_a_mac(tmp_path, options):
    data_dir = make_synthetic_mnist(tmp_path / "mnist")
    short = ["--hidden-dim", "16", *options]
    main.main(flags(data_dir, tmp_path, "--epochs", "1", *short))  # both models, side by side: training in threads
    with AsOnAMac():  # scoring and drawing run in this thread
        main.main(flags(data_dir, tmp_path, "--eval"))
        resumed = main.main(flags(data_dir, tmp_path, "--epochs", "2", "--resume", *short))
    assert resumed["vae"]["epochs"] == 2 and resumed["ae"]["epochs"] == 2
