"""Resume, signals in every phase, kill -9, a full disk, out of memory, two runs in one folder, bad checkpoints,
numerical failure, unwritable folders, fuzzed IDX files."""
import contextlib
import copy
import dataclasses
import errno
import gzip
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpoint_files
import main
import metrics
import models
import plots
import run_folders
import training
import utils
from conftest import FAST_SCORES, ROOT, check_error_line, make_synthetic_mnist, run_expecting_error

QUIET = {**os.environ, "TQDM_DISABLE": "1"}


def flags(data_dir, out, epochs, *extra):
    return ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "checkpoints"),
            "--figure-dir", str(out / "figures"), "--epochs", str(epochs), "--hidden-dim", "16", *FAST_SCORES,
            *extra]


def weights(out, kind):
    return checkpoint_files.load_checkpoint(out / "checkpoints" / f"{kind}.pt")["model"]


def start_main(argv, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *map(str, argv)], cwd=cwd, env=QUIET,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, seconds=60):
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert path.exists(), process.communicate()


def no_half_written_files(folder):
    """Every file a run leaves reads whole: no temporary file is left, checkpoints load, JSON parses."""
    for path in folder.rglob("*"):
        assert not path.name.endswith(".tmp"), path
        if path.suffix == ".pt":
            checkpoint_files.load_checkpoint(path)
        if path.suffix == ".json":
            json.loads(path.read_text())


@pytest.mark.parametrize("options", [[], ["--binarize", "dynamic", "--kl-warmup", "3", "--precision", "bf16",
                                          "--condition", "label"],
                                     ["--objective", "iwae", "--k", "3", "--binarize", "dynamic", "--kl-warmup", "3"]],
                         ids=["default", "dynamic-bf16-conditional", "iwae"])
def test_resume_gives_the_same_weights_bit_for_bit(synthetic_mnist, tmp_path, options):
    main.main(flags(synthetic_mnist, tmp_path / "straight", 4, *options, "--no-figures"))
    main.main(flags(synthetic_mnist, tmp_path / "resumed", 2, *options, "--no-figures"))
    main.main(flags(synthetic_mnist, tmp_path / "resumed", 4, "--resume", "--no-figures"))
    for kind in ["vae", "ae"]:
        straight, resumed = weights(tmp_path / "straight", kind), weights(tmp_path / "resumed", kind)
        assert all(torch.equal(straight[name], resumed[name]) for name in straight), kind
    history = checkpoint_files.load_checkpoint(tmp_path / "resumed" / "checkpoints" / "vae.pt")["history"]
    assert [record["epoch"] for record in history] == [1, 2, 3, 4]


def test_a_signal_in_training_keeps_the_last_epoch_says_so_and_the_run_resumes(tmp_path):
    signal_number = signal.SIGINT  # SIGTERM takes the same path (the other phases' test sends it)
    data_dir = make_synthetic_mnist(tmp_path / "mnist", n_train=4096, n_test=64)
    out = tmp_path / "run"
    process = start_main(flags(data_dir, out, 1000), tmp_path)  # both models, side by side
    checkpoint = out / "checkpoints" / "vae.pt"
    wait_for(checkpoint, process)
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    printed = check_error_line(stderr)
    assert printed.startswith(f"error: stopped by {signal.Signals(signal_number).name} while training")
    assert "--resume" in printed
    saved_epochs = checkpoint_files.load_checkpoint(checkpoint)["epoch"]
    assert f"vae.pt holds epoch {saved_epochs};" in printed  # what the line claims is what the disk holds
    main.main(flags(data_dir, out, saved_epochs + 1, "--models", "vae", "--resume", "--no-figures"))
    assert checkpoint_files.load_checkpoint(checkpoint)["epoch"] == saved_epochs + 1


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    data_dir = make_synthetic_mnist(folder / "mnist")
    with contextlib.chdir(folder):  # its classifier cache stays in this folder
        main.main(flags(data_dir, folder, 1))
    return data_dir, folder


@pytest.fixture
def trained(trained_once, tmp_path):
    """A fresh copy of one short run's data, checkpoints and figures: each test damages its own."""
    shutil.copytree(trained_once[1], tmp_path, dirs_exist_ok=True)
    return tmp_path / "mnist", tmp_path


def sends_itself(number, function):
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), number)  # the handler runs at the next bytecode, before `function` starts
        return function(*args, **kwargs)
    return wrapped


@pytest.mark.parametrize("function, phase", [
    ("load_dataset", "reading the data"), ("train_classifier", "training the scoring classifier"),
    ("evaluate_loss", "scoring the losses"), ("iwae_nll", "computing the IWAE bound"),
    ("sample_quality", "scoring samples"), ("plot_generation", "drawing the figures"),
    ("write_latent_evolution", "drawing the GIF"),
])
def test_a_signal_in_any_other_phase_ends_the_run_in_one_line_and_leaves_no_half_file(trained, capsys, monkeypatch,
                                                                                       function, phase):
    data_dir, out = trained
    if function == "train_classifier":
        (out / "checkpoints" / "classifier-mnist.pt").unlink()  # the cache (this test's working folder is `out`)
    number = signal.SIGTERM if function == "iwae_nll" else signal.SIGINT
    module = next(module for module in (utils, metrics, plots) if hasattr(module, function))
    monkeypatch.setattr(module, function, sends_itself(number, getattr(module, function)))
    code, printed = run_expecting_error(flags(data_dir, out, 1, "--resume"), capsys)
    assert code == 130
    assert printed.startswith(f"error: stopped by {signal.Signals(number).name} while {phase}; ")
    assert "vae.pt holds epoch 1" in printed and "--resume" in printed
    no_half_written_files(out)
    assert (out / "checkpoints" / "classifier-mnist.pt").exists() == (function != "train_classifier")


def test_kill_9_at_any_moment_leaves_checkpoints_that_load_and_a_run_that_resumes(tmp_path):
    data_dir = make_synthetic_mnist(tmp_path / "mnist", n_train=2048, n_test=64)
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    moments = random.Random(0)
    for attempt in range(3):  # bigger checkpoints, so that some kills land while one is being written
        process = start_main(flags(data_dir, out, 1000, "--hidden-dim", "400", "--resume"), tmp_path)
        wait_for(checkpoints / "ae.pt", process)
        time.sleep(moments.uniform(0.0, 2.0))
        process.kill()
        process.wait()
        assert {path.name for path in checkpoints.iterdir() if not path.name.startswith(".")} <= {
            "vae.pt", "ae.pt", "classifier-mnist.pt"}
        for kind in ["vae", "ae"]:
            if (checkpoints / f"{kind}.pt").exists():
                assert checkpoint_files.load_checkpoint(checkpoints / f"{kind}.pt")["epoch"] >= 1
    epochs = max(checkpoint_files.load_checkpoint(checkpoints / f"{kind}.pt")["epoch"] for kind in ["vae", "ae"]) + 1
    main.main(flags(data_dir, out, epochs, "--hidden-dim", "400", "--resume", "--no-figures"))  # the lock is free
    assert all(checkpoint_files.load_checkpoint(checkpoints / f"{kind}.pt")["epoch"] == epochs for kind in ["vae", "ae"])


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A 4 MB tmpfs mounted for the test where it may mount one (root); elsewhere a folder whose renames fail with
    ENOSPC once `full` is set, which is where a full disk shows in write_atomically."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    state = {"folder": folder, "mounted": mounted, "full": False}
    if not mounted:
        real_replace = os.replace

        def replace(source, target):
            if state["full"] and str(target).startswith(str(folder)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_replace(source, target)
        monkeypatch.setattr(os, "replace", replace)
    yield state
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(disk, *, room=0):
    """Fill the small disk to its last byte, or to its last `room` bytes (a page each for the folders' locks)."""
    if disk["mounted"]:
        (disk["folder"] / "room").write_bytes(b"\0" * room)
        with contextlib.suppress(OSError), open(disk["folder"] / "filler", "ab", buffering=0) as filler:
            while True:
                filler.write(b"\0" * 4096)
        (disk["folder"] / "room").unlink()
    disk["full"] = True


def test_a_full_disk_fails_in_one_line_and_keeps_the_previous_checkpoint_and_figure(synthetic_mnist, tmp_path,
                                                                                   small_disk, capsys):
    out = small_disk["folder"]
    main.main(flags(synthetic_mnist, out, 1, "--models", "vae"))
    before = {path: path.read_bytes() for path in [out / "checkpoints" / "vae.pt", out / "figures" / "manifold.png"]}
    fill(small_disk, room=2 * 4096)  # the two folders' locks fit, a checkpoint does not
    code, printed = run_expecting_error(flags(synthetic_mnist, out, 2, "--models", "vae", "--resume"),
                                        capsys)
    assert code == 1 and "cannot write" in printed and "vae.pt keeps its previous contents" in printed
    assert "No space left on device" in printed
    fill(small_disk)  # the room the locks took is free again
    with pytest.raises(utils.ProjectError, match="manifold.png keeps its previous contents"):
        utils.save_figure(plots.Figure(), out / "figures" / "manifold.png")
    assert {path: path.read_bytes() for path in before} == before
    assert checkpoint_files.load_checkpoint(out / "checkpoints" / "vae.pt")["epoch"] == 1
    assert not [path for path in out.rglob("*.tmp")]


@pytest.mark.parametrize("argv, failing, words", [
    (["--hidden-dim", "200000000"], None, "building the models; lower --hidden-dim (now 200000000)"),
    ([], "sample_quality", "scoring samples; lower --quality-samples (now 500)"),
])
def test_out_of_memory_names_the_flag_that_asked_for_too_much(synthetic_mnist, tmp_path, capsys, monkeypatch, argv,
                                                              failing, words):
    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1e12 bytes")
    if failing:
        monkeypatch.setattr(metrics, failing, no_memory)
    code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, 1, *argv), capsys)
    assert code == 1 and printed.startswith(f"error: out of memory while {words}")


def test_a_second_run_into_a_folder_in_use_stops_and_names_the_first(synthetic_mnist, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, utils\nwith utils.FolderLock(sys.argv[1]):\n"
                               "    print('locked', flush=True); time.sleep(120)", str(tmp_path / "checkpoints")],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, 1), capsys)
        assert code == 1 and f"is in use by another run of main.py (process {holder.pid})" in printed
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
    main.main(flags(synthetic_mnist, tmp_path, 1, "--no-figures"))  # a folder left locked by a dead run is taken over
    assert (tmp_path / "checkpoints" / "vae.pt").is_file()
    assert not list(tmp_path.rglob(".lock"))  # a run that ends leaves no lock behind


def test_nan_loss_stops_with_epoch_and_step_and_says_what_the_disk_holds(synthetic_mnist, tmp_path, capsys,
                                                                         monkeypatch):
    def diverging(logits, x):
        return (logits * float("nan")).sum()
    with monkeypatch.context() as patch:
        patch.setattr(models, "bernoulli_nll", diverging)
        code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path / "fresh", 3, "--models", "ae"), capsys)
    assert code == 1 and "no checkpoint is saved yet" in printed and "keeps" not in printed
    main.main(flags(synthetic_mnist, tmp_path, 1, "--models", "ae", "--no-figures"))
    before = (tmp_path / "checkpoints" / "ae.pt").read_bytes()
    monkeypatch.setattr(models, "bernoulli_nll", diverging)
    code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, 3, "--models", "ae", "--resume"), capsys)
    assert code == 1 and "epoch 2 by step 2" in printed and "lower --lr" in printed
    assert re.search(r"checkpoints/ae\.pt holds epoch 1;", printed)
    assert (tmp_path / "checkpoints" / "ae.pt").read_bytes() == before


def test_a_model_failing_beside_the_other_stops_both_and_names_itself(synthetic_mnist, tmp_path, capsys,
                                                                      monkeypatch):
    def diverging_forward(self, x, labels=None, kl_weight=1.0, generator=None):
        loss = (self.decode(self.encode(x)) * float("nan")).sum()
        return loss, {"bce": loss.detach()}
    monkeypatch.setattr(models.VAE, "forward", diverging_forward)
    code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, 500), capsys)
    assert code == 1 and printed.startswith("error: VAE loss became NaN")
    assert not (tmp_path / "checkpoints" / "vae.pt").exists()
    ae_checkpoint = tmp_path / "checkpoints" / "ae.pt"
    # the AE, beside it, is stopped within its current step: its 500 epochs would take it half a minute
    assert not ae_checkpoint.exists() or checkpoint_files.load_checkpoint(ae_checkpoint)["epoch"] < 10


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
    ("architecture", "do not fit its own config"), ("not a checkpoint", "not a checkpoint of this project"),
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


def test_a_checkpoint_carrying_code_is_refused_with_why_and_no_unsafe_advice(synthetic_mnist, tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    path = tmp_path / "checkpoints" / "vae.pt"
    path.write_bytes(pickle.dumps({"config": {}, "model": RunsCode(), "history": []}, protocol=2))
    code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, 1, "--eval"), capsys)
    assert code == 1 and "was refused: loading it would call" in printed and "system" in printed
    assert "weights_only" not in printed and "False" not in printed
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


# ---------------------------------------------------------------- whatever a file holds, the disk or the pipe does

def rewrite_checkpoint(path, change):
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)


def set_history_field(checkpoint, field, value):
    checkpoint["history"][0][field] = value


@pytest.mark.parametrize("change, words", [
    (lambda c: c["config"].update(attention_heads=4),
     "its config has a field this version does not know ('attention_heads'; a newer version"),
    (lambda c: c["config"].pop("kind"), "its config lacks the field 'kind'"),
    (lambda c: c["config"].update(latent_dim="20"), "its config's latent_dim is '20', not a valid int"),
    (lambda c: c["config"].update(arch="transformer"), "its config's arch is 'transformer'"),
    (lambda c: c["model"]["decoder.0.weight"].fill_(float("nan")), "its weight decoder.0.weight holds NaN"),
    (lambda c: c["model"].update({"decoder.0.weight": torch.zeros(3, 3)}), "decoder.0.weight is not a torch.float32"),
    (lambda c: c["model"].update({"decoder.0.bias": c["model"]["decoder.0.bias"].double()}), "not a torch.float32"),
    (lambda c: set_history_field(c, "epoch", 2), "its epochs are [2], not 1 to 1"),
    (lambda c: set_history_field(c, "test", {"loss": float("nan")}), "epoch 1 has no finite test loss"),
    (lambda c: c["args"].update(binarize="sometimes"), "its stored flag --binarize is 'sometimes'"),
    (lambda c: c["args"].update(lr=-1.0), "its stored flag --lr is -1.0"),
    (lambda c: c.update(threads="two"), "says it trained on 'two' threads"),
])
@pytest.mark.parametrize("mode", ["--eval", "--resume"])
def test_a_checkpoint_is_read_as_data_and_each_fault_is_one_line_naming_the_file(trained, capsys, change, words,
                                                                                mode):
    data_dir, out = trained
    path = out / "checkpoints" / "vae.pt"
    rewrite_checkpoint(path, change)
    before = path.read_bytes()
    code, printed = run_expecting_error(flags(data_dir, out, 2, mode), capsys)
    assert code == 1 and str(path) in printed and words in printed, printed
    assert path.read_bytes() == before


def test_each_checkpoint_is_read_and_rebuilt_once_per_run(trained, monkeypatch):
    data_dir, out = trained
    rebuilt, restore = [], checkpoint_files.restore_model
    monkeypatch.setattr(checkpoint_files, "restore_model", lambda *args, **kwargs: rebuilt.append(
        Path(args[1]).name) or restore(*args, **kwargs))
    main.main(flags(data_dir, out, 2, "--resume", "--no-figures"))  # read, continued, then scored as they are
    assert rebuilt == ["vae.pt", "ae.pt"]


def test_a_config_field_may_be_a_bool_or_zero_and_is_checked_as_its_flag_checks_it(tmp_path):
    @dataclasses.dataclass
    class Config:
        conditional: bool = False
        warmup: int = 1

    parser = main.build_parser()
    parser.add_argument("--warmup", type=main.number(int, 0))
    assert checkpoint_files.dataclass_from(Config, {"conditional": True, "warmup": 0}, "c.pt", parser) == \
        Config(True, 0)
    for bad in ({"conditional": 1}, {"warmup": -1}, {"warmup": True}, {"warmup": 0.5}):
        with pytest.raises(utils.ProjectError, match="c.pt: its config's"):
            checkpoint_files.dataclass_from(Config, bad, "c.pt", parser)


def test_adam_moments_that_do_not_fit_are_one_line_on_resume(trained, capsys):
    data_dir, out = trained
    rewrite_checkpoint(out / "checkpoints" / "ae.pt",
                       lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)))
    code, printed = run_expecting_error(flags(data_dir, out, 2, "--resume"), capsys)
    assert code == 1 and "ae.pt: its optimizer or random state cannot be restored" in printed, printed
    main.main(flags(data_dir, out, 1, "--eval", "--no-figures"))  # --eval, which needs no optimizer, still works


@pytest.mark.parametrize("damage", [
    lambda adam: adam["state"][0].update(exp_avg_sq=torch.tensor(-0.5)),  # fused Adam aborted the process on it
    lambda adam: adam["state"][0].update(exp_avg=torch.zeros(2)),
    lambda adam: adam["param_groups"][0].update(amsgrad=True),  # a KeyError inside Adam's step
    lambda adam: adam["param_groups"][0].update(lr=None),
])
def test_an_adam_state_with_other_settings_or_unfit_moments_is_refused_before_any_step(damage):
    model = torch.nn.Linear(3, 2)
    trained = torch.optim.Adam(model.parameters(), fused=True)
    model(torch.randn(4, 3)).sum().backward()
    trained.step()
    saved = copy.deepcopy(trained.state_dict())
    damage(saved)
    with pytest.raises(ValueError):
        checkpoint_files.restore_adam(torch.optim.Adam(model.parameters(), fused=True), saved)
    checkpoint_files.restore_adam(torch.optim.Adam(model.parameters(), fused=True), trained.state_dict())
    unfused = torch.optim.Adam(model.parameters(), fused=False)  # as on a device without fused Adam
    checkpoint_files.restore_adam(unfused, trained.state_dict())
    assert unfused.param_groups[0]["fused"] is False  # how Adam runs stays this machine's
    unfused.step()


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**40), st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
                 st.text(max_size=5), st.lists(st.integers(0, 3), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                              st.integers(), max_size=2),
                 st.builds(lambda shape: torch.randn(shape), st.lists(st.integers(0, 3), max_size=2)))


REMOVED = object()


def field_paths(checkpoint):
    """Every place in a checkpoint where a value can be replaced: (container, key) pairs."""
    places = [(checkpoint, key) for key in checkpoint]
    for key in ("config", "args", "model", "rng"):
        places += [(checkpoint[key], field) for field in checkpoint[key]]
    places += [(record, field) for record in checkpoint["history"] for field in record]
    places += [(record["test"], field) for record in checkpoint["history"] for field in record["test"]]
    places += [(checkpoint["optimizer"]["state"][0], field) for field in checkpoint["optimizer"]["state"][0]]
    places += [(checkpoint["optimizer"]["param_groups"][0], field) for field in checkpoint["optimizer"]["param_groups"][0]]
    return places


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), mode=st.sampled_from(["--eval", "--resume"]))
def test_any_field_of_a_checkpoint_replaced_by_anything_gives_a_result_or_one_line(trained_once, data, mode):
    run_with_one_field_replaced(data, trained_once, ["vae.pt", "ae.pt"], field_paths, mode)


def run_with_one_field_replaced(data, trained, names, places_of, *extra):
    """Copy a trained run's checkpoints, replace one field (of places_of(checkpoint)) of one of
    `names` by anything or remove it, then run main with `extra`: it must end in a result or in one line."""
    data_dir, source = trained
    out = Path(tempfile.mkdtemp())
    shutil.copytree(source / "checkpoints", out / "checkpoints")
    path = out / "checkpoints" / data.draw(st.sampled_from(names))
    checkpoint = torch.load(path, weights_only=True)
    container, key = data.draw(st.sampled_from(places_of(checkpoint)))
    value = data.draw(st.one_of(st.just(REMOVED), JUNK))
    if value is REMOVED:  # a field the file lacks, optional or not
        del container[key]
    else:
        container[key] = value
    torch.save(checkpoint, path)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            main.main(flags(data_dir, out, 2, *extra, "--no-figures"))
        except SystemExit as exited:
            assert exited.code in (1, 2), stderr.getvalue()
            check_error_line(stderr.getvalue())
    shutil.rmtree(out)


@pytest.fixture(scope="module")
def trained_with_a_discriminator(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adversarial")
    data_dir = make_synthetic_mnist(folder / "mnist")
    with contextlib.chdir(folder):
        main.main(flags(data_dir, folder, 1, "--models", "vae", "--adversarial-weight", "0.5", "--no-figures"))
    return data_dir, folder


def discriminator_field_paths(checkpoint):
    """Every place in a checkpoint's discriminator (its weights, its Adam) a value can be replaced."""
    discriminator, adam = checkpoint["discriminator"], checkpoint["discriminator"]["optimizer"]
    places = [(discriminator, key) for key in discriminator]
    places += [(discriminator["model"], key) for key in discriminator["model"]]
    places += [(adam, key) for key in adam] + [(adam["param_groups"][0], key) for key in adam["param_groups"][0]]
    return places + [(adam["state"][0], key) for key in adam["state"][0]]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_field_of_the_discriminator_replaced_by_anything_gives_a_result_or_one_line_on_resume(
        trained_with_a_discriminator, data):
    run_with_one_field_replaced(data, trained_with_a_discriminator, ["vae.pt"], discriminator_field_paths,
                                "--resume", "--models", "vae")


def test_a_full_disk_at_the_folder_lock_is_one_line(trained, small_disk, capsys):
    if not small_disk["mounted"]:
        pytest.skip("no tmpfs could be mounted here, so no disk fills at the lock's own write")
    data_dir, out = trained
    figures = small_disk["folder"] / "figures"
    figures.mkdir()
    fill(small_disk)
    code, printed = run_expecting_error([*flags(data_dir, out, 1, "--eval"), "--figure-dir", figures], capsys)
    assert code == 1 and f"cannot write to {figures}/ (No space left on device)" in printed, printed


def test_a_closed_pipe_ends_the_run_quietly_and_leaves_no_half_file(tmp_path):
    data_dir = make_synthetic_mnist(tmp_path / "mnist")
    argv = [sys.executable, str(ROOT / "main.py"), *flags(data_dir, tmp_path, 3)]
    process = subprocess.Popen(argv, cwd=tmp_path, env=QUIET, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith("device")  # `| head -1`: one line read, then the pipe closes
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 141 and stderr == "", stderr
    no_half_written_files(tmp_path)
    # a closed stderr, where the run has an error to say
    process = subprocess.Popen([*argv, "--eval", "--checkpoint-dir", str(tmp_path / "none")], cwd=tmp_path, env=QUIET,
                               text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stderr.close()
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 141 and "Traceback" not in stdout, stdout


def test_flags_the_checkpoint_decides_are_named_an_error_for_the_model_and_a_note_for_training(trained, capsys):
    data_dir, out = trained
    code, printed = run_expecting_error(flags(data_dir, out, 2, "--resume", "--latent-dim", "7"), capsys)
    assert code == 2 and printed.startswith("error: --latent-dim 7 contradicts") and "(latent_dim 20)" in printed
    main.main(flags(data_dir, out, 2, "--resume", "--lr", "0.01", "--models", "vae", "--no-figures"))
    assert "note: --lr 0.01 is not used: --resume continues" in capsys.readouterr().out
    main.main(flags(data_dir, out, 5, "--eval", "--latent-dim", "7", "--hidden-dim", "16", "--models", "vae",
                    "--no-figures"))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 2, notes  # --hidden-dim 16 is the checkpoint's own: nothing to say
    assert "--latent-dim 7 is not used: --eval evaluates" in notes[0] and "(latent_dim 20)" in notes[0]
    assert "--epochs 5 is not used" in notes[1] and "(epochs 2)" in notes[1]
    shown = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], capture_output=True, text=True).stdout
    assert "a model flag that differs is an error" in " ".join(shown.split())


def test_a_classifier_cache_of_another_dataset_or_damaged_is_one_line(tmp_path):
    classifier = metrics.DigitClassifier()
    metrics.save_classifier(tmp_path / "c.pt", classifier, 0.9, "fashion-mnist")
    with pytest.raises(utils.ProjectError, match=r"trained on 'fashion-mnist', not mnist\); delete it"):
        metrics.load_classifier(tmp_path / "c.pt", "cpu", "mnist")
    classifier.head.weight.data.fill_(float("inf"))
    metrics.save_classifier(tmp_path / "c.pt", classifier, 0.9, "mnist")
    with pytest.raises(utils.ProjectError, match="head.weight holds NaN or infinite"):
        metrics.load_classifier(tmp_path / "c.pt", "cpu", "mnist")


def test_a_sampler_whose_codes_are_all_equal_still_scores():
    codes = torch.ones(200, 4)
    samples = models.LatentGaussian.fitted(codes).draw(300, torch.Generator().manual_seed(0))
    assert samples.isfinite().all() and samples.std(dim=0).max() < 0.01
    features = torch.ones(300, 8)
    assert metrics.frechet_distance(features, features) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- from the first instant to the last line

@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_torch_imports_is_one_line(tmp_path, number):
    process = start_main(["--eval", "--checkpoint-dir", tmp_path], tmp_path)
    time.sleep(0.4)  # torch takes a second or more to import
    process.send_signal(number)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr == f"error: stopped by {signal.Signals(number).name} before the run began; nothing was written\n"


def test_a_signal_while_a_download_waits_stops_the_run(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def waiting_download(**kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the network, waited on; the handler ends the wait
    monkeypatch.setattr(torchvision.datasets, "MNIST", waiting_download)
    code, printed = run_expecting_error(["--data-dir", tmp_path / "empty", "--epochs", "1"], capsys)
    assert code == 130 and printed.startswith("error: stopped by SIGINT while reading the data")


def test_standard_output_on_a_full_disk_or_closed_is_one_line_after_the_work(trained, capsys, monkeypatch):
    data_dir, out = trained
    (out / "figures" / "metrics.json").unlink()
    capsys.readouterr()
    with open("/dev/full", "w") as full, pytest.raises(SystemExit) as exited:
        monkeypatch.setattr(sys, "stdout", full)
        with utils.script_streams():  # as main.py run as a script has them
            main.main(flags(data_dir, out, 1, "--eval", "--no-figures"))
    printed = capsys.readouterr().err
    assert exited.value.code == 1 and (out / "figures" / "metrics.json").is_file(), printed  # the work is done
    assert printed.startswith("error: could not write to standard output (No space left on device)"), printed
    assert len(printed.splitlines()) == 1, printed
    closed = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], env=QUIET, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: os.close(1), timeout=60)
    assert closed.returncode == 1 and closed.stderr.startswith("error: could not write to standard output (it "
                                                               "is closed)"), closed.stderr


def test_names_the_file_system_refuses_or_cannot_print_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main.parse_args(["--checkpoint-dir", str(tmp_path / ("x" * 300) / "run")])
    printed = capsys.readouterr().err
    assert exited.value.code == 2 and "is 300 bytes long, and this file system takes at most 255" in printed
    with pytest.raises(utils.ProjectError, match="cannot use the path"):
        utils.is_file(tmp_path / ("y" * 300))
    folder = os.fsencode(tmp_path) + b"/runs-\xff"  # a folder whose name is not UTF-8
    os.mkdir(folder)
    ran = subprocess.run([sys.executable, str(ROOT / "main.py"), "--eval", "--checkpoint-dir", folder], cwd=tmp_path,
                         env={**QUIET, "PYTHONIOENCODING": "utf-8"}, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1 and "Traceback" not in ran.stderr
    assert ran.stderr.startswith("error: no checkpoint at ") and "runs-\\udcff/vae.pt" in ran.stderr


def test_a_checkpoint_without_its_stored_flags_or_its_config_s_condition_evaluates_with_the_defaults(trained):
    data_dir, out = trained  # as one written before they were stored
    for kind in ("vae", "ae"):
        rewrite_checkpoint(out / "checkpoints" / f"{kind}.pt",
                           lambda checkpoint: (checkpoint.pop("args"), checkpoint["config"].pop("condition")))
    scores = main.main(flags(data_dir, out, 1, "--eval", "--no-figures"))
    assert scores["vae"]["flags"]["binarize"] == "none" and "condition" not in scores["vae"]["config"]


def test_compare_checks_the_files_it_reads_before_it_writes_and_refuses_other_datasets(trained, capsys):
    data_dir, out = trained
    compare = ["--data-dir", data_dir, "--checkpoint-dir", out / "checkpoints", "--figure-dir", out / "figures",
               "--compare"]
    main.main([str(word) for word in compare])
    written = out / "figures" / "comparison" / "comparison.json"
    before = written.read_bytes()
    scores = json.loads((out / "figures" / "metrics.json").read_text())
    scores["vae"]["test"]["loss"] = "102.9"
    (out / "figures" / "metrics.json").write_text(json.dumps(scores))
    code, printed = run_expecting_error(compare, capsys)
    assert code == 1 and "metrics.json: its vae.test.loss is '102.9', not a number; rewrite it" in printed
    assert written.read_bytes() == before
    scores["vae"]["test"]["loss"] = 102.9
    (out / "figures" / "metrics.json").write_text(json.dumps(scores))
    other = out / "checkpoints" / "comparison" / "fashion"
    other.mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "vae.pt", other / "vae.pt")
    (out / "figures" / "comparison" / "fashion").mkdir()
    (out / "figures" / "comparison" / "fashion" / "metrics.json").write_text(json.dumps({**scores,
                                                                                       "dataset": "fashion-mnist"}))
    code, printed = run_expecting_error(compare, capsys)
    assert code == 1 and "was scored with dataset mnist" in printed and "with fashion-mnist: their numbers" in printed
    conditional = {**scores, "vae": {**scores["vae"], "config": {**scores["vae"]["config"], "condition": "label"}}}
    (out / "figures" / "comparison" / "fashion" / "metrics.json").write_text(json.dumps(conditional))
    code, printed = run_expecting_error(compare, capsys)  # -log p(x | y) is no -log p(x)
    assert code == 1 and "with --condition none" in printed and "compare runs of one --condition" in printed
    assert written.read_bytes() == before


def test_the_command_that_resumes_works_when_pasted():
    import shlex

    args = main.parse_args(["--checkpoint-dir", "my runs", "--epochs", "3", "--figure-dir", "figures"])
    message = run_folders.stop_message("SIGINT", "training", args)
    command = message.split("continue with: ")[1]
    assert command == "python main.py --checkpoint-dir 'my runs' --epochs 3 --figure-dir figures --resume"
    assert shlex.split(command)[2:-1] == args.argv


def test_a_failed_write_on_a_read_only_disk_is_one_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(utils.ProjectError, match=r"cannot write .*a\.json \(Read-only file system\); nothing is "
                                                 r"written"):
        utils.write_atomically(tmp_path / "a.json", read_only)  # the cleanup's own failure is not a second error


def test_a_resume_on_another_kind_of_device_says_what_it_cannot_continue(capsys):
    model = torch.nn.Linear(3, 2)
    optimizer = utils.make_optimizer(model, 1e-3, torch.device("cpu"))
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    order = torch.Generator().manual_seed(5)
    checkpoint = {"optimizer": optimizer.state_dict(), "device": "cuda:0", "rng": {"shuffle": torch.ones(3)}}
    training.restore_training_state(checkpoint, "ck/vae.pt", optimizer, {"shuffle": order}, torch.device("cpu"))
    printed = capsys.readouterr().out
    assert printed.startswith("note: ck/vae.pt trained on cuda; on cpu its batch order and its draws start again")
    assert torch.equal(order.get_state(), torch.Generator().manual_seed(5).get_state())  # from its seed


def test_the_generator_states_of_an_older_checkpoint_still_restore():
    model = torch.nn.Linear(3, 2)
    optimizer = utils.make_optimizer(model, 1e-3, torch.device("cpu"))
    saved = {name: torch.Generator().manual_seed(seed).get_state() for name, seed in (("shuffle", 1), ("noise", 2))}
    order, draws = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    checkpoint = {"optimizer": optimizer.state_dict(), "device": "cpu", "rng": saved}  # their earlier names
    training.restore_training_state(checkpoint, "vae.pt", optimizer, {"order": order, "draws": draws},
                                    torch.device("cpu"))
    assert torch.equal(order.get_state(), saved["shuffle"]) and torch.equal(draws.get_state(), saved["noise"])


def test_the_chosen_gpu_is_made_the_current_one_by_its_index(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with torch.backends.cudnn.flags(allow_tf32=True):
        utils.use_device(torch.device("cuda"))  # --device cuda and auto name no index
        utils.use_device(torch.device("cuda:3"))
        assert not torch.backends.cudnn.allow_tf32  # no TF32 in float32 work
    assert chosen == [0, 3]
    torch.backends.cuda.matmul.allow_tf32 = False


def test_a_gpu_that_lacks_an_operation_is_one_line_naming_it_and_the_way_out(monkeypatch):
    args = main.parse_args(["--epochs", "1"])
    monkeypatch.setattr(utils, "pick_device", lambda name: torch.device("mps"))
    phases = utils.Phases()
    with pytest.raises(utils.ProjectError, match=r"^the mps device failed while scoring samples \(The operator "
                                                 r"'aten::linalg_eigh' is not .*\); run with --device cpu \(details in "
                                                 r"figures/error-report\.txt\)$"):
        with run_folders.one_line_errors(args, phases), phases("scoring samples"):
            raise NotImplementedError("The operator 'aten::linalg_eigh' is not currently implemented for the MPS "
                                      "device.")
    with pytest.raises(utils.ProjectError, match=r"^ValueError while scoring samples \(a bug\): a bug of this program"):
        with run_folders.one_line_errors(args, phases):  # the program's own: a report, never --device cpu
            raise ValueError("a bug")
