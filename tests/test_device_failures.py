"""What a failure leaves behind, on any device, tested on the CPU with injected faults: a bug's one line names a report
file with its traceback, command, versions and device; only the device's own failures suggest --device cpu; a CUDA
stream is waited for however its job ends; a run leaves torch's process-wide settings as it found them."""
import argparse
import contextlib

import pytest
import torch

import main
import metrics
import run_folders
import utils
from conftest import FAST_SCORES, run_expecting_error

MISMATCH = "Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"
MPS_LACKS = "The operator 'aten::_foo' is not currently implemented for the MPS device."


def flags(data_dir, out, epochs, *extra):
    return ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "checkpoints"), "--figure-dir",
            str(out / "figures"), "--epochs", str(epochs), "--hidden-dim", "16", *FAST_SCORES, *extra]


def test_a_bug_is_one_line_naming_a_report_with_its_traceback_command_versions_and_device(synthetic_mnist, tmp_path,
                                                                                         capsys, monkeypatch):
    def misplaced(*args, **kwargs):
        raise RuntimeError(MISMATCH)
    monkeypatch.setattr(metrics, "evaluate_loss", misplaced)
    code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, 1, "--models", "vae"), capsys)
    report = tmp_path / "figures" / "error-report.txt"
    assert code == 1 and printed.startswith("error: RuntimeError while training (Expected all tensors")
    assert "a bug of this program; please report it with" in printed and str(report) in printed
    assert "--device cpu" not in printed  # the device did nothing wrong
    text = report.read_text()
    assert "Traceback (most recent call last)" in text and 'in misplaced' in text and MISMATCH in text
    assert f"torch {torch.__version__}" in text and "python 3." in text and "device: cpu" in text
    assert "phase: training" in text and "command:" in text


@pytest.mark.parametrize("error, device_failure", [
    (NotImplementedError(MPS_LACKS), True), (RuntimeError("CUDA error: unspecified launch failure"), True),
    (RuntimeError("CUDA driver version is insufficient for CUDA runtime version"), True),
    (RuntimeError(MISMATCH), False), (RuntimeError("Placeholder storage has not been allocated on MPS device!"), False),
    (RuntimeError("CUDA error: device-side assert triggered"), False), (ValueError("a bug of ours"), False),
], ids=["mps-lacks-an-op", "lost-device", "driver", "mismatch", "mps-placeholder", "device-assert", "plain-bug"])
def test_only_the_devices_own_failures_suggest_the_cpu(tmp_path, monkeypatch, error, device_failure):
    monkeypatch.setattr(utils, "pick_device", lambda name: torch.device("cuda"))  # as on a GPU machine
    args = argparse.Namespace(device="cuda", figure_dir=str(tmp_path), eval=False)
    phases = utils.Phases()
    with pytest.raises(utils.ProjectError) as raised, phases("training"):
        with run_folders.one_line_errors(args, phases):
            raise error
    line = str(raised.value)
    assert "\n" not in line and str(tmp_path / "error-report.txt") in line
    assert ("run with --device cpu" in line) == device_failure, line
    assert ("a bug of this program" in line) != device_failure, line


def test_a_cuda_stream_is_waited_for_however_its_job_ends(monkeypatch):
    waited = []

    class Stream:
        def __init__(self, device):
            pass

        def wait_stream(self, other):
            pass

        def synchronize(self):
            waited.append(True)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())

    def failing():
        raise RuntimeError("the job failed")
    with pytest.raises(RuntimeError, match="the job failed"):
        utils.on_own_stream(failing, torch.device("cuda"))
    with pytest.raises(utils.Stopped):
        utils.on_own_stream(lambda: (_ for _ in ()).throw(utils.Stopped("SIGINT")), torch.device("cuda"))
    assert utils.on_own_stream(lambda: 7, torch.device("cuda")) == 7
    assert waited == [True, True, True]


def test_a_run_leaves_the_global_random_state_threads_and_tf32_as_it_found_them(synthetic_mnist, tmp_path):
    torch.manual_seed(1234)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    main.main(flags(synthetic_mnist, tmp_path, 1, "--no-figures", "--seed", "5"))
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
