"""studies.py: seeds, grids, the latent study and the comparison as studies of main.py runs, on both
launchers (Slurm where a cluster answers: tests/start_slurm.sh starts one), and the aggregate."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import checkpoint_files
import main
import studies
import utils
from conftest import FAST_SCORES, ROOT, last_line

TINY = ["--hidden-dim", "16", "--epochs", "1", *FAST_SCORES, "--no-figures"]


@pytest.fixture
def tiny(synthetic_mnist, committed_classifier):
    """main.py's flags for a run of a second or two on the synthetic data."""
    return ["--data-dir", str(synthetic_mnist), *TINY]


def check_error_line(stderr):
    """The study ended with one line 'error: ...' and no traceback."""
    printed, lines = last_line(stderr)
    assert printed.startswith("error: ") and "Traceback" not in stderr, stderr
    assert sum(line.startswith("error") for line in lines) == 1, stderr
    return printed


def study(*argv):
    return studies.main([str(word) for word in argv])


def expecting_error(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        study(*argv)
    return exited.value.code, check_error_line(capsys.readouterr().err)


def metrics_of(folder):
    return json.loads((folder / "metrics.json").read_text())


# ------------------------------------------------------------------------------ the local launcher

def test_a_seeds_study_runs_each_seed_in_its_folder_then_aggregates_and_skips_them_after(
        tmp_path, tiny, capsys):
    aggregate = study("seeds", "--seeds", 2, "--study-dir", tmp_path / "s", "--launcher", "local",
                      "--", *tiny)
    printed = capsys.readouterr().out
    assert "2 at once with 1 torch thread each" in printed or os.cpu_count() < 2, printed
    runs = {seed: metrics_of(tmp_path / "s" / f"seed-{seed}") for seed in (0, 1)}
    for seed, scores in runs.items():
        folder = tmp_path / "s" / f"seed-{seed}"
        assert scores["vae"]["flags"]["seed"] == seed and (folder / "vae.pt").is_file()
        assert json.loads((folder / "run.json").read_text())["flags"] == [*tiny, "--seed", str(seed)]
        log = (folder / "log.txt").read_text()
        assert "VAE epoch   1/1" in log and f"--seed {seed} --checkpoint-dir" in log
    assert runs[0]["vae"]["test"]["loss"] != runs[1]["vae"]["test"]["loss"]
    (group,) = aggregate["groups"]
    loss = group["metrics"]["vae"]["test"]["loss"]
    values = [scores["vae"]["test"]["loss"] for scores in runs.values()]
    assert loss["n"] == 2 and loss["mean"] == pytest.approx(sum(values) / 2)
    assert (loss["min"], loss["max"]) == (min(values), max(values))
    assert group["runs"] == ["seed-0", "seed-1"] and group["seeds"] == [0, 1]
    assert metrics_of(tmp_path / "s") == aggregate
    assert "| test loss" in (tmp_path / "s" / "study.md").read_text()
    assert (tmp_path / "s" / "study.png").stat().st_size > 10_000
    written = (tmp_path / "s" / "seed-0" / "metrics.json").stat().st_mtime_ns
    again = study("seeds", "--seeds", 2, "--study-dir", tmp_path / "s", "--launcher", "local",
                  "--", *tiny)
    assert "2 runs: 2 finished; nothing to run" in capsys.readouterr().out
    assert again == aggregate
    assert (tmp_path / "s" / "seed-0" / "metrics.json").stat().st_mtime_ns == written
    code, line = expecting_error(["seeds", "--seeds", 1, "--study-dir", tmp_path / "s", "--",
                                  *tiny, "--beta", "2"], capsys)
    assert code == 2 and "s/seed-0/ holds a run with --beta 1.0, not 2.0 (its run.json)" in line, line


def test_a_half_done_study_skips_the_finished_run_and_resumes_the_stopped_one(tmp_path, tiny, capsys):
    two_epochs = [*tiny, "--epochs", "2"]
    study("seeds", "--seeds", 1, "--study-dir", tmp_path / "s", "--launcher", "local", "--", *two_epochs)
    finished = (tmp_path / "s" / "seed-0" / "metrics.json").stat().st_mtime_ns
    stopped = tmp_path / "s" / "seed-1"  # a run stopped after its first epoch, as Ctrl-C leaves it
    main.main([*tiny, "--seed", "1", "--checkpoint-dir", str(stopped), "--figure-dir", str(stopped)])
    capsys.readouterr()
    aggregate = study("seeds", "--seeds", 3, "--study-dir", tmp_path / "s", "--launcher", "local",
                      "--", *two_epochs)
    assert "3 runs: 1 finished, 1 stopped, 1 new" in capsys.readouterr().out
    assert (tmp_path / "s" / "seed-0" / "metrics.json").stat().st_mtime_ns == finished
    assert "resuming" in (stopped / "log.txt").read_text()
    history = checkpoint_files.load_checkpoint(stopped / "vae.pt")["history"]
    assert [record["epoch"] for record in history] == [1, 2]
    assert aggregate["groups"][0]["metrics"]["vae"]["epochs"]["n"] == 3


def test_ctrl_c_stops_the_local_runs_which_save_and_says_how_to_continue(tmp_path, tiny):
    command = [sys.executable, str(ROOT / "studies.py"), "seeds", "--seeds", "2", "--study-dir",
               str(tmp_path / "s"), "--launcher", "local", "--", *tiny, "--epochs", "5000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = [tmp_path / "s" / f"seed-{seed}" / "log.txt" for seed in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(log.exists() and "epoch   2/5000" in log.read_text() for log in logs):
        assert time.monotonic() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)  # to the study alone: it passes the stop on to its runs
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    line = check_error_line(err)
    assert line.startswith("error: stopped by SIGINT; 0 of 2 runs finished"), line
    assert line.endswith(f"continue with: python studies.py {' '.join(command[2:])}"), line
    for log in logs:
        text = log.read_text()
        assert "error: stopped by SIGINT while training" in text and "--resume" in text, text
        assert checkpoint_files.load_checkpoint(log.parent / "vae.pt")["epoch"] >= 2
    assert "seed-0: stopped: error: stopped by SIGINT while training" in out, out


def test_a_failed_run_is_named_with_its_log_and_the_others_results_are_kept(tmp_path, tiny, capsys):
    code, line = expecting_error(["grid", "--grid", "lr=0.001,1e30", "--study-dir", tmp_path / "g",
                                  "--launcher", "local", "--", *tiny], capsys)
    failed = tmp_path / "g" / "lr-1e30"
    assert code == 1 and f"lr-1e30 (exit code 1): see {failed / 'log.txt'}" in line, line
    assert "loss became NaN or infinite" in (failed / "log.txt").read_text()
    assert (tmp_path / "g" / "lr-0.001" / "metrics.json").is_file()
    aggregate = metrics_of(tmp_path / "g")
    assert [group["runs"] for group in aggregate["groups"]] == [["lr-0.001"]]


# -------------------------------------------------------------------------------- flags and folders

@pytest.mark.parametrize("argv, expected", [
    (["seeds", "--seeds", "0", "--study-dir", "s"], "argument --seeds: must be at least 1, got 0"),
    (["grid", "--grid", "width=2,4", "--study-dir", "s"], "main.py has no flag --width"),
    (["grid", "--grid", "seed=1,2", "--study-dir", "s"], "--seed cannot vary in a grid"),
    (["grid", "--grid", "latent-dim", "--study-dir", "s"], "expected FLAG=VALUE,VALUE"),
    (["grid", "--grid", "latent-dim=2,x", "--study-dir", "s"],
     "argument --latent-dim: expected an integer, got 'x'"),
    (["seeds", "--seeds", "2", "--study-dir", "s", "--", "--figure-dir", "f"],
     "--figure-dir after --: each run's is STUDY_DIR/NAME"),
    (["seeds", "--seeds", "2", "--study-dir", "s", "--", "--epochs", "0"],
     "argument --epochs: must be at least 1, got 0"),
    (["seeds", "--seeds", "2", "--study-dir", "s", "--epochs", "3"], "unrecognized arguments"),
    (["aggregate", "nowhere"], "nowhere/ holds no run folder with a metrics.json"),
])
def test_flags_that_cannot_make_a_study_are_one_line(argv, expected, capsys):
    code, line = expecting_error(argv, capsys)
    assert code == 2 and expected in line, line


def test_two_studies_cannot_write_one_folder(tmp_path, tiny, capsys):
    with utils.FolderLock(tmp_path / "s"):
        code, line = expecting_error(["seeds", "--seeds", 2, "--study-dir", tmp_path / "s",
                                      "--launcher", "local", "--", *tiny], capsys)
    assert code == 1 and f"{tmp_path / 's'}/ is in use by another study (process {os.getpid()})" in line


def test_the_launcher_is_slurm_where_sbatch_is_on_the_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert studies.pick_launcher(argparse.Namespace(launcher="auto")) == "local"
    code, line = expecting_error(["seeds", "--seeds", 2, "--study-dir", tmp_path / "s", "--launcher", "slurm"],
                                 capsys)
    assert code == 2 and "sbatch is not on the PATH" in line, line
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    assert studies.pick_launcher(argparse.Namespace(launcher="auto")) == "slurm"
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_a_run_still_in_slurms_queue_is_not_submitted_again(tmp_path, tiny, monkeypatch, capsys):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "squeue").write_text("#!/bin/sh\necho 7_1\n")  # job 7_1 pending
    (tmp_path / "bin" / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    for seed in (0, 1):
        (tmp_path / "s" / f"seed-{seed}").mkdir(parents=True)
        (tmp_path / "s" / f"seed-{seed}" / "slurm-job").write_text(f"7_{seed}\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # seed-0's job left the queue: it runs here
        study("seeds", "--seeds", 2, "--study-dir", tmp_path / "s", "--launcher", "local", "--", *tiny)
    printed = capsys.readouterr()
    code, line = exited.value.code, check_error_line(printed.err)
    assert "2 runs: 1 new, 1 queued" in printed.out, printed.out
    assert code == 1 and "1 run of an earlier submission still in Slurm's queue (seed-1: job 7_1): watch " \
                          "them with squeue -j 7; once they end: python studies.py seeds" in line, line
    assert (tmp_path / "s" / "seed-0" / "metrics.json").is_file()
    assert not (tmp_path / "s" / "seed-1" / "log.txt").exists()


# --------------------------------------------------------------------------------- the aggregate

def fake_run(folder, seed, loss, *, latent_dim=20, dataset="mnist"):
    """A run folder whose metrics.json holds known numbers."""
    (folder).mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({
        "dataset": dataset, "notes": "the same text",
        "vae": {"test": {"loss": loss}, "epochs": 30, "trained_on": "cpu", "codes": [loss, 2 * loss],
                "config": {"latent_dim": latent_dim}, "flags": {"seed": seed, "lr": 0.001}}}))


def test_the_aggregate_sums_up_known_numbers_per_setting(tmp_path, capsys):
    for seed, loss in enumerate([100.0, 102.0, 104.0]):
        fake_run(tmp_path / "s" / f"seed-{seed}", seed, loss)
    fake_run(tmp_path / "s" / "seed-10", 10, 90.0, latent_dim=2)  # another setting: its own group
    aggregate = study("aggregate", tmp_path / "s")
    (first, second) = aggregate["groups"]
    assert first["label"] == "latent_dim 20" and first["runs"] == ["seed-0", "seed-1", "seed-2"]
    assert first["metrics"]["vae"]["test"]["loss"] == {"mean": 102.0, "sd": 2.0, "n": 3, "min": 100.0,
                                                       "max": 104.0}
    assert first["metrics"]["vae"]["codes"][1]["mean"] == 204.0  # a list, number by number
    assert first["metrics"]["vae"]["trained_on"] == "cpu" and first["metrics"]["notes"] == "the same text"
    assert first["metrics"]["vae"]["flags"]["seed"]["max"] == 2 and first["seeds"] == [0, 1, 2]
    assert second["runs"] == ["seed-10"] and second["metrics"]["vae"]["test"]["loss"]["sd"] is None
    table = (tmp_path / "s" / "study.md").read_text()
    assert "| 102.0 ± 2.0 [100.0, 104.0] |" in table and "| vae.test.loss | 102.00 | 2.000 | 3 |" in table
    fake_run(tmp_path / "s" / "other", 0, 1.0, dataset="fashion-mnist")
    code, line = expecting_error(["aggregate", tmp_path / "s"], capsys)
    assert code == 2 and "an aggregate sums up runs of one dataset" in line, line


def test_compare_gives_each_difference_with_its_spread(tmp_path, capsys):
    for seed, (a, b) in enumerate([(100.0, 97.0), (102.0, 99.0), (104.0, 98.0)]):
        fake_run(tmp_path / "a" / f"seed-{seed}", seed, a)
        fake_run(tmp_path / "b" / f"seed-{seed}", seed, b)
    table = study("compare", tmp_path / "a", tmp_path / "b")
    # b - a = 98 - 102 = -4, sd 2 and 1: standard error sqrt(4 / 3 + 1 / 3) = 1.29
    assert "| 102.0 ± 2.0 (n 3) | 98.0 ± 1.0 (n 3) | -4 ± 1.3 (3.1 se) |" in table, table


def test_a_run_folder_is_not_overwritten_by_an_aggregate(tmp_path, capsys):
    fake_run(tmp_path / "run" / "inner", 0, 1.0)
    (tmp_path / "run" / "metrics.json").write_text((tmp_path / "run" / "inner" / "metrics.json").read_text())
    code, line = expecting_error(["aggregate", tmp_path / "run"], capsys)
    assert code == 2 and "is a run's metrics, not a study's" in line, line


# ---------------------------------------------------------------- the latent study and the comparison

def test_latent_study_keeps_each_run_apart_and_compares_them(synthetic_mnist, tmp_path, committed_classifier,
                                                            capsys):
    """Moved from test_main.py with --latent-study, which is now `python studies.py latent`."""
    from PIL import Image

    folders = ["--checkpoint-dir", tmp_path / "checkpoints", "--figure-dir", tmp_path / "figures"]
    run_flags = ["--data-dir", synthetic_mnist, "--hidden-dim", "16", "--epochs", "2", *FAST_SCORES]
    trained = study("latent", "--sizes", 2, 3, *folders, "--launcher", "local", "--", *run_flags)
    for size in (2, 3):
        checkpoint = checkpoint_files.load_checkpoint(tmp_path / "checkpoints" / f"latent-{size}" / "vae.pt")
        assert checkpoint["config"]["latent_dim"] == size
        assert (tmp_path / "figures" / f"latent-{size}" / "metrics.json").is_file()
        with Image.open(tmp_path / "figures" / f"latent-{size}" / "latent_evolution.gif") as gif:
            assert gif.n_frames == 2  # one frame per epoch
    assert set(trained) == {"2", "3"} and set(trained["2"]) == {"vae", "ae"}
    assert {"mse", "psnr", "ssim", "test_loss", "test_nll_iwae"} <= set(trained["2"]["vae"])
    assert (tmp_path / "figures" / "latent_study.png").is_file()
    (tmp_path / "figures" / "latent_study.json").unlink()
    evaluated = study("latent", "--sizes", 2, 3, *folders, "--launcher", "local", "--", *run_flags, "--eval")
    assert evaluated == trained == json.loads((tmp_path / "figures" / "latent_study.json").read_text())
    code, line = expecting_error(["latent", "--sizes", 2, "--", "--latent-dim", 4], capsys)
    assert code == 2 and "--latent-dim after --: the study gives each run its size" in line


def test_main_py_points_latent_study_to_studies_py(capsys):
    with pytest.raises(SystemExit) as exited:
        main.main(["--latent-study", "2", "4", "--figure-dir", "f"])
    line = check_error_line(capsys.readouterr().err)
    assert exited.value.code == 2
    assert "--latent-study moved to studies.py: python studies.py latent --sizes 2 4 --checkpoint-dir " \
           "checkpoints --figure-dir f" in line, line


def test_the_comparison_trains_slims_and_compares_its_variants(tmp_path, tiny, capsys):
    folders = ["--checkpoint-dir", tmp_path / "checkpoints", "--figure-dir", tmp_path / "figures"]
    main.main([*tiny, *map(str, folders)])  # the reference run
    table = study("comparison", "--only", "mlp", *folders, "--launcher", "local", "--", *tiny)
    assert set(table) == {"VAE (reference)", "AE (reference)", "mlp"}
    slimmed = checkpoint_files.load_checkpoint(tmp_path / "checkpoints" / "comparison" / "mlp" / "vae.pt")
    assert "optimizer" not in slimmed and len(slimmed["history"]) == 1
    log = (tmp_path / "figures" / "comparison" / "mlp" / "log.txt").read_text()
    assert log.count("\n$ ") + log.startswith("$ ") == 2 and "--eval --slim" in log
    assert (tmp_path / "figures" / "comparison" / "comparison.png").is_file()
    capsys.readouterr()
    assert study("comparison", "--only", "mlp", *folders, "--launcher", "local", "--", *tiny) == table
    assert "1 run: 1 finished; nothing to run" in capsys.readouterr().out


# ------------------------------------------------------------------------------- a real Slurm

def slurm_answers():
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return False
    try:
        listed = subprocess.run(["sinfo", "--noheader", "--format", "%T"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and any(state.startswith(("idle", "mix")) for state in listed.stdout.split())


@pytest.mark.skipif(not slurm_answers(), reason="no Slurm cluster answers (sudo bash tests/start_slurm.sh "
                                                "starts one)")
def test_a_study_runs_as_one_slurm_job_array_and_reads_as_a_local_one(tmp_path, tiny):
    command = [sys.executable, str(ROOT / "studies.py"), "seeds", "--seeds", "2", "--launcher", "slurm",
               "--cpus-per-task", "1", "--time", "10"]
    ran = subprocess.run([*command, "--study-dir", str(tmp_path / "slurm"), "--", *tiny], capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    array = ran.stdout.split("as Slurm job array ")[1].split(":")[0]
    assert f"watch them with squeue -j {array}, cancel them with scancel {array}" in ran.stdout
    assert f"seed-1: Slurm job {array}_1, its log {tmp_path / 'slurm' / 'seed-1' / 'log.txt'}" in ran.stdout
    assert "Traceback" not in ran.stderr and "sacct" not in ran.stdout + ran.stderr
    local = study("seeds", "--seeds", 2, "--launcher", "local", "--study-dir", tmp_path / "local", "--", *tiny)
    on_slurm = metrics_of(tmp_path / "slurm")
    (local,), (on_slurm,) = local["groups"], on_slurm["groups"]  # one thread each on both: the same numbers
    assert on_slurm["runs"] == local["runs"] == ["seed-0", "seed-1"]
    for part in ("test", "reconstruction", "latent"):
        assert on_slurm["metrics"]["vae"][part] == local["metrics"]["vae"][part]
    assert on_slurm["metrics"]["samples"] == local["metrics"]["samples"]
