"""Resume, interruption, bad checkpoints, numerical failure, unwritable folders, fuzzed IDX files."""
import gzip
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import models
import utils
from conftest import COMMITTED_CLASSIFIER, FAST_SCORES, make_synthetic_mnist, run_expecting_error, write_idx

ROOT = Path(__file__).resolve().parents[1]


def flags(data_dir, out, epochs, *extra):
    return ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "checkpoints"),
            "--figure-dir", str(out / "figures"), "--epochs", str(epochs), "--hidden-dim", "16", *FAST_SCORES,
            *extra]


def weights(out, kind):
    return utils.load_checkpoint(out / "checkpoints" / f"{kind}.pt")["model"]


@pytest.mark.parametrize("options", [[], ["--binarize", "dynamic", "--kl-warmup", "3"], ["--precision", "bf16"]],
                         ids=["default", "dynamic", "bf16"])
def test_resume_gives_the_same_weights_bit_for_bit(synthetic_mnist, tmp_path, options):
    import main
    main.main(flags(synthetic_mnist, tmp_path / "straight", 4, *options))
    main.main(flags(synthetic_mnist, tmp_path / "resumed", 2, *options))
    main.main(flags(synthetic_mnist, tmp_path / "resumed", 4, "--resume"))
    for kind in ["vae", "ae"]:
        straight, resumed = weights(tmp_path / "straight", kind), weights(tmp_path / "resumed", kind)
        assert all(torch.equal(straight[name], resumed[name]) for name in straight), kind
    history = utils.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "vae.pt")["history"]
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_keeps_the_last_epoch_and_the_run_resumes(tmp_path, signal_number):
    data_dir = make_synthetic_mnist(tmp_path / "mnist", n_train=4096, n_test=64)
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "main.py"), *flags(data_dir, out, 1000)]  # both models, side by side
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TQDM_DISABLE": "1"})
    checkpoint = out / "checkpoints" / "vae.pt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert checkpoint.exists(), process.communicate()
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: stopped by {signal.Signals(signal_number).name}")
    assert "--resume" in last_line and "Traceback" not in stderr
    saved_epochs = utils.load_checkpoint(checkpoint)["epoch"]
    assert saved_epochs >= 1
    shutil.copy(COMMITTED_CLASSIFIER, out / "checkpoints")  # its cache: not the subject here
    resume = [sys.executable, str(ROOT / "main.py"),
              *flags(data_dir, out, saved_epochs + 1, "--models", "vae", "--resume")]
    resumed = subprocess.run(resume,
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "TQDM_DISABLE": "1"})
    assert resumed.returncode == 0, resumed.stderr
    assert utils.load_checkpoint(checkpoint)["epoch"] == saved_epochs + 1


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(synthetic_mnist, tmp_path, capsys,
                                                                      monkeypatch):
    import main
    main.main(flags(synthetic_mnist, tmp_path, 1, "--models", "ae"))
    before = (tmp_path / "checkpoints" / "ae.pt").read_bytes()
    monkeypatch.setattr(models, "bernoulli_nll", lambda logits, x: (logits * float("nan")).sum())
    code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, 3, "--models", "ae", "--resume"), capsys)
    assert code == 1 and "epoch 2 by step 2" in printed and "lower --lr" in printed
    assert (tmp_path / "checkpoints" / "ae.pt").read_bytes() == before


def test_a_model_failing_beside_the_other_stops_both_and_names_itself(synthetic_mnist, tmp_path, capsys,
                                                                      monkeypatch):
    def diverging_forward(self, x, kl_warmup=1.0, noise=None):
        loss = (self.decode(self.encode(x)) * float("nan")).sum()
        return loss, {"bce": loss.detach()}
    monkeypatch.setattr(models.VAE, "forward", diverging_forward)
    code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, 500), capsys)
    assert code == 1 and printed.startswith("error: VAE loss became NaN")
    assert not (tmp_path / "checkpoints" / "vae.pt").exists()
    ae_checkpoint = tmp_path / "checkpoints" / "ae.pt"
    assert not ae_checkpoint.exists() or utils.load_checkpoint(ae_checkpoint)["epoch"] < 500  # stopped, not finished


def test_bf16_where_it_cannot_run_fails_and_where_it_would_be_slow_says_so(monkeypatch, capsys):
    with pytest.raises(utils.ProjectError, match="not mps; use --precision fp32"):
        utils.check_bf16(torch.device("mps"))
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", "avx512_bf16": False})
    utils.check_bf16(torch.device("cpu"))
    assert "no bfloat16 instructions" in capsys.readouterr().out
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"architecture": "x86_64", "avx512_bf16": True})
    utils.check_bf16(torch.device("cpu"))
    assert capsys.readouterr().out == ""


def test_unwritable_output_folder_fails_before_training(synthetic_mnist, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, printed = run_expecting_error(
        ["--data-dir", synthetic_mnist, "--checkpoint-dir", blocker / "checkpoints", "--epochs", "1"], capsys)
    assert code == 1 and "cannot write to" in printed and "checkpoints" in printed


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    import main
    folder = tmp_path_factory.mktemp("trained")
    data_dir = make_synthetic_mnist(folder / "mnist")
    main.main(flags(data_dir, folder, 1))
    return data_dir, folder


@pytest.fixture
def trained(trained_once, tmp_path):
    """A fresh copy of one short run's data, checkpoints and figures: each test damages its own."""
    shutil.copytree(trained_once[1], tmp_path, dirs_exist_ok=True)
    return tmp_path / "mnist", tmp_path


def damage(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif how == "other kind":
        path.write_bytes((path.parent / "ae.pt").read_bytes())
    elif how == "architecture":
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["config"]["hidden_dim"] = 32
        torch.save(checkpoint, path)
    elif how == "not a checkpoint":
        torch.save({"weights": torch.ones(2)}, path)


@pytest.mark.parametrize("how, words", [
    ("truncated", "not a readable checkpoint"), ("other kind", "holds the AE model, not the VAE"),
    ("architecture", "do not fit the model"), ("not a checkpoint", "not a checkpoint of this project"),
])
@pytest.mark.parametrize("mode", ["--eval", "--resume"])
def test_bad_checkpoints_give_one_line_and_touch_nothing(trained, capsys, how, words, mode):
    data_dir, out = trained
    damage(out / "checkpoints" / "vae.pt", how)
    before = {path.name: path.read_bytes() for path in (out / "checkpoints").iterdir()}
    code, printed = run_expecting_error(flags(data_dir, out, 2, mode), capsys)
    assert code == 1 and words in printed
    assert {path.name: path.read_bytes() for path in (out / "checkpoints").iterdir()} == before


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_checkpoint_carrying_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "vae.pt"
    path.write_bytes(pickle.dumps({"config": {}, "model": RunsCode(), "history": []}, protocol=2))
    with pytest.raises(utils.ProjectError, match="not a readable checkpoint"):
        utils.load_checkpoint(path)
    assert not (tmp_path / "pwned.txt").exists()


def valid_idx(kind, count):
    shape = (count, 28, 28) if kind == "images" else (count,)
    array = np.random.default_rng(count).integers(0, 256, size=shape, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in shape)
    return header + array.tobytes(), array


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["images", "labels"]), count=st.integers(0, 3), compress=st.booleans(),
       cuts=st.lists(st.tuples(st.integers(0, 3200), st.integers(0, 255)), max_size=4),
       truncate=st.one_of(st.none(), st.integers(0, 3200)), garbage=st.binary(max_size=40))
def test_idx_reader_returns_the_array_or_raises_its_own_error(tmp_path, kind, count, compress, cuts, truncate,
                                                              garbage):
    raw, array = valid_idx(kind, count)
    mutated = bytearray(raw)
    for position, value in cuts:
        if position < len(mutated):
            mutated[position] = value
    if truncate is not None:
        mutated = mutated[:truncate]
    mutated = bytes(mutated) + garbage
    data = gzip.compress(mutated) if compress else mutated
    path = tmp_path / "file"
    path.write_bytes(data)
    try:
        result = utils.read_idx(path, kind)
    except utils.ProjectError as error:
        assert str(path) in str(error)
        return
    if mutated == raw:
        assert np.array_equal(result, array)
    assert result.dtype == np.uint8 and result.ndim == (3 if kind == "images" else 1)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_idx_reader_on_random_bytes(tmp_path, data):
    path = tmp_path / "random"
    path.write_bytes(data)
    try:
        utils.read_idx(path, "labels")
    except utils.ProjectError:
        pass
