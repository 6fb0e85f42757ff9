"""The GPU: these tests run only where CUDA is present and skip elsewhere, so that the suite stays
green on CPUs. tests/device_check.sh runs them on a GPU machine, then times the default run, --eval
and the benchmark there. A short run, --eval and --resume on the GPU; --eval of the committed
checkpoints against figures/metrics.json (the CPU's numbers); and a stand-in for Apple's MPS,
which has no float64: the same short run with any float64 operation on the GPU an error."""
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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
NOT_SCORES = {"trained_on", "threads", "notes", "file"}
COUNTED = ("share", "accuracy", "class_changes")  # shares of samples, pairs or images: one may cross a threshold


def close(ours, theirs, where):
    """Float32 rounding: 1e-3 relative; a share or an accuracy may also move by a sample or two."""
    counted = any(word in where for word in COUNTED)
    return math.isclose(ours, theirs, rel_tol=1e-3, abs_tol=2e-3 if counted else 1e-6)


def flags(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "checkpoints"), "--figure-dir",
            str(out / "figures"), "--device", "cuda", *FAST_SCORES, *extra]


def test_a_short_run_evaluates_and_resumes_on_the_gpu(tmp_path, committed_classifier):
    trained = main.main(flags(REAL_MNIST, tmp_path, "--epochs", "1"))
    assert trained["vae"]["trained_on"].startswith("cuda") and trained["vae"]["test"]["loss"] < 140
    assert trained["vae"]["test_nll_iwae"]["nats"] < trained["vae"]["test"]["loss"]
    evaluated = main.main(flags(REAL_MNIST, tmp_path, "--eval"))
    for kind in ("vae", "ae"):
        assert evaluated[kind]["test"] == pytest.approx(trained[kind]["test"], rel=1e-5)
    main.main(flags(REAL_MNIST, tmp_path, "--epochs", "2", "--resume"))
    for kind in ("vae", "ae"):
        checkpoint = checkpoint_files.load_checkpoint(tmp_path / "checkpoints" / f"{kind}.pt")
        assert [record["epoch"] for record in checkpoint["history"]] == [1, 2]
        assert checkpoint["device"].startswith("cuda")


def differences(ours, theirs, where=""):
    """[(relative difference, where)] of every number two metrics.json hold, timings aside."""
    if isinstance(theirs, dict):
        return [found for key in theirs if key not in NOT_SCORES
                for found in differences(ours[key], theirs[key], f"{where}.{key}".lstrip("."))]
    if isinstance(theirs, list):
        return [found for k, item in enumerate(theirs) for found in differences(ours[k], item, f"{where}[{k}]")]
    if isinstance(theirs, float) and not isinstance(theirs, bool):
        return [(abs(ours - theirs) / max(abs(theirs), 1e-12), where, close(ours, theirs, where))]
    return []


def test_eval_of_the_committed_checkpoints_gives_the_cpus_numbers(tmp_path, committed_classifier):
    (tmp_path / "figures").mkdir()
    shutil.copy(ROOT / "figures" / "metrics.json", tmp_path / "figures")  # its IWAE sample count
    main.main(["--eval", "--data-dir", str(REAL_MNIST), "--checkpoint-dir", str(ROOT / "checkpoints"),
               "--figure-dir", str(tmp_path / "figures"), "--device", "cuda"])
    ours = json.loads((tmp_path / "figures" / "metrics.json").read_text())
    found = differences(ours, json.loads((ROOT / "figures" / "metrics.json").read_text()))
    assert len(found) > 100 and all(fits for _, _, fits in found), [item for item in found if not item[2]]


class Float64OnTheGPU(AssertionError):
    pass


class NoFloat64OnTheGPU(TorchDispatchMode):
    """Apple's MPS, as far as float64 goes: any operation that reads or makes a float64 tensor
    anywhere but on the CPU is an error."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in tree_leaves((args, kwargs, result)):
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64 and tensor.device.type != "cpu":
                raise Float64OnTheGPU(f"{func} in float64 on {tensor.device}")
        return result


def test_a_run_without_float64_on_the_gpu_as_on_a_mac(tmp_path):
    data_dir = make_synthetic_mnist(tmp_path / "mnist")
    with NoFloat64OnTheGPU():  # the threads that train aside: scoring and drawing run here
        main.main(flags(data_dir, tmp_path, "--epochs", "1", "--hidden-dim", "16", "--models", "ae"))
        main.main(flags(data_dir, tmp_path, "--epochs", "1", "--hidden-dim", "16", "--models", "vae"))
        main.main(flags(data_dir, tmp_path, "--eval"))
