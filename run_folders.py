"""The folders a run reads and writes, and what the checkpoints in them decide: which models a
folder holds, the flags and the dataset they were trained with (a flag given otherwise is named),
the folders locked while a run writes them, and the one line a run ends with when a signal or a
failed allocation stops it, naming what the folders hold. Trains, scores and draws nothing."""
import argparse
import contextlib
import dataclasses
import shlex
from pathlib import Path

import checkpoint_files
import utils
from checkpoint_files import MODEL_FLAGS, TRAINING_FLAGS
from models import MODEL_NAMES

MEMORY_FLAGS = {  # the flags that size what a phase allocates, named when it runs out of memory
    "building the models": ["hidden_dim", "hidden_layers", "latent_dim"],
    "training": ["batch_size", "hidden_dim"],
    "scoring samples": ["quality_samples"],
    "computing the IWAE bound": ["nll_samples"],
}


@dataclasses.dataclass
class RunFolder:
    """One run: its flags (a copy, with the models it covers decided) and the saved models it
    evaluates or continues ({kind: checkpoint_files.SavedModel})."""
    args: argparse.Namespace
    saved: dict


def open_run(run_args, parser):
    """The run of `run_args`: the models it covers (--models; with --eval by default those the
    folder holds) and the checkpoints --eval evaluates or --resume continues, each read and
    checked now, before any data is read or any training."""
    folder = run_args.checkpoint_dir
    paths = {kind: checkpoint_files.checkpoint_path(folder, kind) for kind in MODEL_NAMES}
    present = [kind for kind, path in paths.items() if utils.is_file(path)]
    kinds = run_args.models or (present if run_args.eval and present else list(MODEL_NAMES))
    run_args = argparse.Namespace(**{**vars(run_args), "models": kinds})
    read = []  # a new run reads none
    if run_args.eval:
        read = kinds
    elif run_args.resume:  # it continues those saved, and starts the others afresh
        read = [kind for kind in kinds if kind in present]
    saved = {kind: checkpoint_files.read_saved_model(paths[kind], kind, parser) for kind in read}
    name_decided_flags(run_args, saved)
    return RunFolder(run_args, saved)


def name_decided_flags(run_args, saved):
    """The flags given on the command line that the checkpoints decide instead, named in one line
    each: with --resume a model flag that differs is an error (the weights are that model), a
    training flag a note (the run continues exactly as it began); --eval uses neither."""
    decided = {}  # (flag, the checkpoint's value, the given value) -> the files
    for model in saved.values():
        stored = {**model.flags, **model.checkpoint["config"],  # the config is the model's truth
                  "epochs": len(model.checkpoint["history"])}
        for flag in MODEL_FLAGS + TRAINING_FLAGS + ["dataset"] + ["epochs"] * run_args.eval:
            given = getattr(run_args, flag)
            if flag in run_args.given and flag in stored and stored[flag] != given:
                decided.setdefault((flag, stored[flag], given), []).append(str(model.path))
    for (flag, value, given), paths in decided.items():
        option, files = f"--{flag.replace('_', '-')}", " and ".join(paths)
        if run_args.resume and flag in MODEL_FLAGS:
            raise utils.ProjectError(f"{option} {given} contradicts {files} ({flag} {value}): "
                                     "--resume continues that model; drop the flag, or train a "
                                     "new model into another --checkpoint-dir", exit_code=2)
        mode = "--resume continues" if run_args.resume else "--eval evaluates"
        print(f"note: {option} {given} is not used: {mode} {files} as trained ({flag} {value})")


def dataset_of(args, runs):
    """--dataset, unless the checkpoints were trained on another: --eval and --resume follow."""
    stored = {model.flags["dataset"] for run in runs for model in run.saved.values()}
    if len(stored) > 1:
        raise utils.ProjectError(f"the checkpoints under {args.checkpoint_dir}/ were trained on "
                                 f"{' and '.join(sorted(stored))}: evaluate one folder at a time")
    return stored.pop() if stored else args.dataset


@contextlib.contextmanager
def locked(runs, evaluating):
    """Hold the lock of each folder the runs write into while they do: the figure folders and,
    when training or slimming, the checkpoint folders. Resolved, so that a folder named twice is
    locked once."""
    folders = [run.args.figure_dir for run in runs]
    folders += [run.args.checkpoint_dir for run in runs if not evaluating or run.args.slim]
    with contextlib.ExitStack() as locks:
        for folder in dict.fromkeys(Path(folder).resolve() for folder in folders):
            locks.enter_context(utils.FolderLock(folder))
        yield


# ------------------------------------------------------------------ how a stopped run ends

def stop_message(signal_name, phase, args):
    """The line a signal ends the run with: the phase, what the checkpoints on disk hold, and
    how to go on."""
    if args.eval:
        return (f"stopped by {signal_name} while {phase}; the checkpoints are untouched; run the "
                "same command again")
    paths = [checkpoint_files.checkpoint_path(args.checkpoint_dir, kind)
             for kind in args.models or MODEL_NAMES]
    command = shlex.join(["python", "main.py", *args.argv, "--resume"])  # works when pasted
    return (f"stopped by {signal_name} while {phase}; {checkpoint_files.saved_epochs(paths)}; "
            f"continue with: {command}")


def memory_advice(args, phase):
    """How to ask for less memory in `phase`: the flags that size it, of those this command
    takes (--eval takes the model and training flags from the checkpoints, so it is never told
    to lower them)."""
    flags = MEMORY_FLAGS.get(phase, ["hidden_dim", "batch_size"])
    if args.eval:
        flags = [flag for flag in flags if flag not in MODEL_FLAGS + TRAINING_FLAGS]
    named = [f"--{flag.replace('_', '-')} (now {getattr(args, flag)})" for flag in flags
             if getattr(args, flag) is not None]
    if named:
        return "lower " + " or ".join(named)
    return "free memory (close other programs) or evaluate on a machine with more"


@contextlib.contextmanager
def one_line_errors(args, phases):
    """Whatever stops a run, in any phase, becomes one line that names the phase: a signal (with
    what the disk holds), a failed allocation (with the flags to lower), a GPU's own failure (an
    operation it lacks, a lost device: with --device cpu); anything else is a bug of this
    program, whose traceback, command, versions and device go into a report file that the line
    names. A GPU's failure keeps such a report too."""
    try:
        yield
    except utils.Stopped as stopped:
        message = stop_message(stopped.signal_name, phases.current, args)
        raise utils.ProjectError(message, exit_code=130) from None
    except (utils.ProjectError, BrokenPipeError):  # BrokenPipeError: main.py's streams end it
        raise
    except Exception as error:  # MemoryError, RuntimeError, ...: a BaseException is no failure
        device = utils.pick_device(args.device)
        on_a_gpu = device.type != "cpu"
        if utils.is_out_of_memory(error):
            raise utils.ProjectError(f"out of memory{f' on {device}' * on_a_gpu} while "
                                     f"{phases.current}; {memory_advice(args, phases.current)}"
                                     f"{', or run with --device cpu' * on_a_gpu}") from None
        report = utils.write_error_report(error, args.figure_dir, phases.current, device)
        if on_a_gpu and utils.is_device_failure(error):
            raise utils.ProjectError(f"the {device} device failed while {phases.current} "
                                     f"({utils.first_line(error, 120)}); run with --device cpu "
                                     f"(details in {report})") from None
        raise utils.ProjectError(f"{type(error).__name__} while {phases.current} "
                                 f"({utils.first_line(error, 100)}): a bug of this program; "
                                 f"please report it with {report} (its traceback)") from None
