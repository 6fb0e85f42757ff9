"""Studies: many runs of main.py, each in its own folder, run as local processes or as one Slurm job
array through submitit, then summed up over the seeds.

    python studies.py seeds --seeds 5 --study-dir runs/seeds -- --epochs 10
    python studies.py grid --grid latent-dim=2,4,16 beta=1,2 --study-dir runs/grid -- --epochs 10
    python studies.py latent --sizes 2 4 16 20       # docs/experiments.md's latent-size study
    python studies.py comparison                     # docs/experiments.md's sharpness comparison
    python studies.py aggregate runs/seeds           # mean, sd, n, min, max over the seeds
    python studies.py compare runs/a runs/b          # each headline number's difference

Each run is `python main.py FLAGS --checkpoint-dir CHECKPOINT_DIR/NAME --figure-dir STUDY_DIR/NAME`,
its output in STUDY_DIR/NAME/log.txt and its flags in STUDY_DIR/NAME/run.json. The same command
again skips the finished runs and resumes the stopped ones (main.py --resume). Read it top to
bottom: the flags; the runs of each kind of study; their state on disk; the two launchers; the
aggregate and its table and figure; main().
"""
import os
import signal


def stopped_before_the_study(number, frame):
    """A Ctrl-C or SIGTERM while torch imports (main.py's flags check the runs): one line, 130."""
    try:
        os.write(2, f"error: stopped by {signal.Signals(number).name} before the study began; "
                    "nothing was started\n".encode())
    finally:
        os._exit(130)


if __name__ == "__main__":  # run as a script, from its first instant
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, stopped_before_the_study)

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure
from tqdm import tqdm

import checkpoint_files
import main as main_py  # main() is this file's own
import report
import utils
from checkpoint_files import MODEL_FLAGS, TRAINING_FLAGS
from models import MODEL_NAMES

ROOT = Path(__file__).resolve().parent
MAIN_SCRIPT = ROOT / "main.py"
STUDY_DECIDES = {  # main.py flags (dests) a study sets for each run, refused after `--`
    "checkpoint_dir": "each run's is CHECKPOINT_DIR/NAME", "figure_dir": "each run's is "
    "STUDY_DIR/NAME", "resume": "a study resumes its stopped runs itself", "latent_study":
    "use python studies.py latent", "compare": "use python studies.py comparison or compare"}
COMPARISON_VARIANTS = {  # docs/experiments.md, "Buying back sharpness": NAME -> main.py flags
    "mlp": ["--epochs", "6"],
    "mlp-perceptual": ["--epochs", "6", "--perceptual-weight", "1"],
    "mlp-adversarial": ["--epochs", "6", "--adversarial-weight", "0.5", "--adversarial-start", "4"],
    "mlp-both": ["--epochs", "6", "--perceptual-weight", "1", "--adversarial-weight", "0.5",
                 "--adversarial-start", "2"],
    "resnet": ["--epochs", "6", "--arch", "resnet", "--hidden-dim", "128"],
    "resnet-both": ["--epochs", "6", "--arch", "resnet", "--hidden-dim", "128",
                    "--perceptual-weight", "1", "--adversarial-weight", "0.5",
                    "--adversarial-start", "2"],
    "resnet-both-adv2": ["--epochs", "6", "--arch", "resnet", "--hidden-dim", "128",
                         "--perceptual-weight", "1", "--adversarial-weight", "2",
                         "--adversarial-start", "2"],
}
EPOCH_LINE = re.compile(r"^(VAE|AE) epoch +(\d+)/(\d+) ", re.MULTILINE)  # main.print_epoch's


# ------------------------------------------------------------------------------------------ flags

def build_parser():
    parser = OneLineErrorParser(
        prog="studies.py", formatter_class=main_py.HelpFormatter,
        description="Run a study (many runs of main.py, each in its own folder) on this "
        "machine's cores or as one Slurm job array, and sum up its runs over their seeds. The "
        "runs' own main.py flags follow `--`.")
    kinds = parser.add_subparsers(dest="kind", metavar="KIND", required=True,
                                  parser_class=OneLineErrorParser)
    seeds = add_kind(kinds, "seeds", help="N seeds of one main.py command")
    seeds.add_argument("--seeds", metavar="N", type=main_py.number(int, 1), required=True,
                       help="how many seeds: --first-seed, the one after, ...")
    grid = add_kind(kinds, "grid", help="every combination of a few flags' values")
    grid.add_argument("--grid", metavar="FLAG=V1,V2", nargs="+", required=True,
                      help="a main.py flag and its values, e.g. latent-dim=2,4,16 beta=1,2")
    grid.add_argument("--seeds", metavar="N", type=main_py.number(int, 1), default=1,
                      help="seeds of each combination")
    latent = add_kind(kinds, "latent", help="one run per latent size, then latent_study.png "
                              "and latent_study.json (docs/experiments.md)")
    latent.add_argument("--sizes", metavar="SIZE", nargs="+", type=main_py.number(int, 1),
                        required=True, help="the latent sizes")
    comparison = add_kind(kinds, "comparison", help="the sharpness variants of "
                                  "docs/experiments.md, each then slimmed (--eval --slim), then "
                                  "main.py --compare against the reference run")
    comparison.add_argument("--only", metavar="NAME", nargs="+", choices=list(COMPARISON_VARIANTS),
                            help="these variants only (default: all seven)")
    for kind in (seeds, grid):
        kind.add_argument("--first-seed", metavar="N", type=int, default=0,
                          help="the first seed")
    for kind, folders in ((seeds, None), (grid, None), (latent, LATENT_FOLDERS),
                          (comparison, COMPARISON_FOLDERS)):
        add_folder_flags(kind, folders)
        add_launcher_flags(kind.add_argument_group("launcher"))
        kind.add_argument("main_flags", nargs="*", metavar="-- MAIN_FLAGS",
                          help="main.py's flags for every run (python main.py --help)")
    add_reading_kinds(kinds)
    return parser


LATENT_FOLDERS = ("checkpoints/latent-study", "figures/latent-study", "CHECKPOINT_DIR/latent-SIZE",
                  "FIGURE_DIR/latent-SIZE, latent_study.png and .json in FIGURE_DIR")
COMPARISON_FOLDERS = ("checkpoints", "figures", "CHECKPOINT_DIR/comparison/NAME (the reference "
                      "run's in CHECKPOINT_DIR)", "FIGURE_DIR/comparison/NAME, comparison.png "
                      "and .json in FIGURE_DIR/comparison")


def add_folder_flags(kind, defaults):
    """--study-dir and --checkpoint-dir (seeds, grid), or --checkpoint-dir and --figure-dir with
    defaults (the latent study, the comparison: the folders main.py used for them)."""
    if defaults is None:
        kind.add_argument("--study-dir", metavar="DIR", type=main_py.folder, required=True,
                          help="the study's folder: each run's figures, metrics.json and log.txt "
                               "in STUDY_DIR/NAME, the aggregate in STUDY_DIR")
        kind.add_argument("--checkpoint-dir", metavar="DIR", type=main_py.folder,
                          help="each run's checkpoints in CHECKPOINT_DIR/NAME (default: "
                               "STUDY_DIR)")
        return
    checkpoints, figures, checkpoints_help, figures_help = defaults
    kind.add_argument("--checkpoint-dir", metavar="DIR", type=main_py.folder, default=checkpoints,
                      help=f"the runs' checkpoints go in {checkpoints_help}")
    kind.add_argument("--figure-dir", metavar="DIR", type=main_py.folder, default=figures,
                      help=f"the runs' figures, metrics.json and log.txt go in {figures_help}")


def add_launcher_flags(group):
    group.add_argument("--launcher", choices=["auto", "local", "slurm"], default="auto",
                       help="local: processes on this machine; slurm: one job array through "
                            "submitit; auto: slurm where sbatch is on the PATH")
    group.add_argument("--array-parallelism", metavar="N", type=main_py.number(int, 1),
                       help="runs at once (default: local, one per core; slurm, all)")
    group.add_argument("--partition", metavar="NAME", help="slurm: the partition")
    group.add_argument("--time", metavar="MINUTES", type=main_py.number(int, 1), default=240,
                       help="slurm: each run's time limit (a run stopped by it resumes when the "
                            "study is run again)")
    group.add_argument("--cpus-per-task", metavar="N", type=main_py.number(int, 1), default=2,
                       help="slurm: cores per run, which its torch threads use")
    group.add_argument("--gpus-per-node", metavar="N", type=main_py.number(int, 0), default=0,
                       help="slurm: GPUs per run")
    group.add_argument("--no-wait", dest="wait", action="store_false",
                       help="slurm: submit, say the job ids and return; `python studies.py "
                            "aggregate` once the runs are done")


def add_reading_kinds(kinds):
    aggregate = add_kind(kinds, "aggregate", help="mean, standard deviation, n, min and max of "
                                 "every number over the runs that differ only in seed: "
                                 "STUDY_DIR/metrics.json, study.md and study.png")
    aggregate.add_argument("study_dir", metavar="STUDY_DIR", type=main_py.folder,
                           help="a folder of run folders, each with its metrics.json")
    compare = add_kind(kinds, "compare", help="each headline number of two studies (one "
                               "setting each), their difference with its spread")
    compare.add_argument("study_dirs", metavar="STUDY_DIR", nargs=2, type=main_py.folder,
                         help="the two studies: the second's numbers minus the first's")


def add_kind(kinds, name, **settings):
    return kinds.add_parser(name, formatter_class=main_py.HelpFormatter, **settings)


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see python studies.py --help)\n")


def parse_args(argv):
    """The flags; those after `--` are main.py's, checked by the runs' own parser later."""
    argv = list(sys.argv[1:] if argv is None else argv)
    mine, main_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    args = build_parser().parse_args(mine)
    if getattr(args, "main_flags", None):  # words after KIND that are no flag of studies.py
        build_parser().error(f"unrecognized arguments: {' '.join(args.main_flags)} (main.py's "
                             "flags go after --)")
    args.main_flags = main_flags
    args.command = ["python", "studies.py", *argv]  # the command that continues the study
    return args


# --------------------------------------------------------------------------- the runs of a study

@dataclasses.dataclass
class Run:
    """One run of main.py: its name, its flags (without its folders), its two folders, and the
    main.py flags it is then evaluated with, if any (the comparison's --eval --slim)."""
    name: str
    flags: list
    checkpoint_dir: Path
    figure_dir: Path
    then: list = dataclasses.field(default_factory=list)

    @property
    def log(self):
        return self.figure_dir / "log.txt"

    def argv(self, *extra):
        return [*self.flags, *extra, "--checkpoint-dir", str(self.checkpoint_dir),
                "--figure-dir", str(self.figure_dir)]


@dataclasses.dataclass
class Study:
    """A study: its folder (the runs' figure folders are in it, the aggregate beside them), its
    runs, and what it writes once they are done (the latent study's table, the comparison)."""
    folder: Path
    runs: list
    finish: object = None  # callable(study, args), or None


def study_of(args):
    """The study the flags describe, each run's flags checked as main.py checks them."""
    forbidden = dict(STUDY_DECIDES)
    if args.kind in ("seeds", "grid"):
        forbidden["seed"] = "the study gives each run its seed: --first-seed, --seeds"
        folder = Path(args.study_dir)
        checkpoints = Path(args.checkpoint_dir or args.study_dir)
        named = seed_runs(args) if args.kind == "seeds" else grid_runs(args, forbidden)
        study = Study(folder, [Run(name, flags, checkpoints / name, folder / name)
                               for name, flags in named])
    elif args.kind == "latent":
        forbidden["latent_dim"] = "the study gives each run its size: --sizes"
        study = latent_study(args)
    else:
        study = comparison_study(args)
    refuse_flags(args.main_flags, forbidden)
    for run in study.runs:
        for argv in (run.argv(), *(run.argv(*then) for then in run.then)):
            main_args(argv)  # each run's flags as main.py reads them: bad ones fail now
    return study


def seed_runs(args):
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    return [(f"seed-{seed}", [*args.main_flags, "--seed", str(seed)]) for seed in seeds]


def grid_runs(args, forbidden):
    """[(name, flags)]: every combination of the grid's values, each with --seeds seeds."""
    axes = [grid_axis(text, forbidden) for text in args.grid]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = []
    for values in itertools.product(*(values for _, values in axes)):
        name = "_".join(f"{option[2:]}-{value}" for (option, _), value in zip(axes, values))
        flags = [word for (option, _), value in zip(axes, values) for word in (option, value)]
        for seed in seeds:
            runs.append((name + f"_seed-{seed}" * (args.seeds > 1 or args.first_seed != 0),
                         [*args.main_flags, *flags, "--seed", str(seed)]))
    return runs


def grid_axis(text, forbidden):
    """"latent-dim=2,4,16" -> ("--latent-dim", ["2", "4", "16"]), the flag one of main.py's
    that takes a value."""
    flag, equals, values = text.partition("=")
    dest = flag.lstrip("-").replace("-", "_")
    actions = {action.dest: action for action in main_py.build_parser()._actions}
    if not equals or not values.strip(","):
        raise utils.ProjectError(f"--grid {text}: expected FLAG=VALUE,VALUE,... (for instance "
                                 "latent-dim=2,4,16)", exit_code=2)
    if dest not in actions or dest == "help":
        raise utils.ProjectError(f"--grid {text}: main.py has no flag --{dest.replace('_', '-')}"
                                 "; see python main.py --help", exit_code=2)
    if dest in forbidden or actions[dest].nargs == 0:
        why = forbidden.get(dest, "it takes no value")
        raise utils.ProjectError(f"--grid {text}: --{dest.replace('_', '-')} cannot vary in a "
                                 f"grid: {why}", exit_code=2)
    return actions[dest].option_strings[0], [value for value in values.split(",") if value]


def latent_study(args):
    """As main.py --latent-study ran it: FIGURE_DIR/latent-SIZE, CHECKPOINT_DIR/latent-SIZE."""
    folder, checkpoints = Path(args.figure_dir), Path(args.checkpoint_dir)
    runs = [Run(f"latent-{size}", [*args.main_flags, "--latent-dim", str(size)],
                checkpoints / f"latent-{size}", folder / f"latent-{size}")
            for size in dict.fromkeys(args.sizes)]
    return Study(folder, runs, finish=write_latent_study)


def comparison_study(args):
    folder = Path(args.figure_dir) / "comparison"
    checkpoints = Path(args.checkpoint_dir) / "comparison"
    runs = [Run(name, ["--models", "vae", *COMPARISON_VARIANTS[name], *args.main_flags],
                checkpoints / name, folder / name, then=[["--eval", "--slim"]])
            for name in args.only or COMPARISON_VARIANTS]
    return Study(folder, runs, finish=write_comparison)


def refuse_flags(flags, forbidden):
    for dest in sorted(given_dests(flags) & set(forbidden)):
        raise utils.ProjectError(f"--{dest.replace('_', '-')} after --: {forbidden[dest]}",
                                 exit_code=2)


def given_dests(flags):
    with main_flag_errors(flags):
        return main_py.given_flags(flags)


def main_args(argv):
    """main.py's parse of `argv` (its one-line errors as ours, naming the flags)."""
    with main_flag_errors(argv):
        return main_py.parse_args(argv)


@contextlib.contextmanager
def main_flag_errors(argv):
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            yield
    except SystemExit:
        reason = said.getvalue().strip().removeprefix("error: ") or "--help runs no study"
        raise utils.ProjectError(f"the runs' main.py flags {shlex.join(argv)}: {reason}",
                                 exit_code=2) from None


# ------------------------------------------------------------------- what the disk says of a run

def run_state(run):
    """"finished" (metrics.json of every model, at --epochs), "stopped" (a checkpoint to
    resume), "new", or "evaluate" (its flags hold --eval: it always runs)."""
    args = main_args(run.argv())
    if args.eval:
        return "evaluate"
    kinds = args.models or list(MODEL_NAMES)
    with contextlib.suppress(utils.ProjectError):
        scores = utils.load_json(run.figure_dir / "metrics.json")
        if all(isinstance(scores.get(kind), dict) and scores[kind].get("epochs") == args.epochs
               for kind in kinds):
            return "finished"
    if any(utils.is_file(run.checkpoint_dir / f"{kind}.pt") for kind in kinds):
        return "stopped"
    return "new"


def commands_of(run, state):
    """The main.py flags to run, one command after the other, for a run in `state`."""
    first = [] if state == "finished" else [run.argv("--resume")] if state == "stopped" \
        else [run.argv()]
    later = [run.argv(*then) for then in run.then if first or needs_slimming(run)]
    return first + later


def needs_slimming(run):
    """A finished comparison run whose checkpoint still holds Adam's state."""
    path = run.checkpoint_dir / "vae.pt"
    return utils.is_file(path) and "optimizer" in checkpoint_files.load_checkpoint(path)


def record_run(run):
    """STUDY_DIR/NAME/run.json: the run's flags. A run folder recorded with another model,
    training or dataset is refused: its checkpoints and numbers are another run's. (--epochs
    may grow: --resume trains on to the new total; scoring flags and --eval change no run.)"""
    path = run.figure_dir / "run.json"
    if main_args(run.argv()).eval:
        return
    if utils.exists(path):
        recorded = utils.load_json(path).get("flags") or []
        before, now = run_settings([*map(str, recorded)]), run_settings(run.flags)
        differing = [flag for flag in now if before[flag] != now[flag]]
        if differing:
            flag = differing[0]
            raise utils.ProjectError(
                f"{run.figure_dir}/ holds a run with --{flag.replace('_', '-')} {before[flag]}, "
                f"not {now[flag]} (its run.json): pick another study folder, or remove that one",
                exit_code=2)
        return
    utils.save_json(path, {"flags": run.flags, "command": shlex.join(["python", "main.py",
                                                                         *run.argv()])})


def run_settings(flags):
    """What makes a run the run it is: its model and training flags and its dataset."""
    args = main_args(flags)
    return {flag: getattr(args, flag) for flag in [*MODEL_FLAGS, *TRAINING_FLAGS, "dataset"]}


# ---------------------------------------------------------------------------------- the launchers

class RunJob:
    """What a run executes on either launcher: its main.py commands one after the other, each
    with the run's torch threads and its output appended to the run's log; the exit code of the
    first that fails, else 0. A Slurm job of the array calls it: it uses the standard library
    only, so that pickled by value (from studies.py run as a script) it needs no import of ours."""

    def __init__(self, commands, cwd, log, threads=None):
        self.commands, self.cwd, self.log, self.threads = commands, cwd, log, threads

    def start(self, command):
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(self.threads)} if self.threads
                                  else {}))
        with open(self.log, "a") as log:
            log.write(f"$ {shlex.join(command[1:])}  # started {clock()}\n")
            log.flush()
            return subprocess.Popen(command, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)

    def __call__(self):
        for command in self.commands:
            code = self.start(command).wait()
            if code:
                return code
        return 0


def clock():
    """The time of day to the millisecond: when a run started, when a study was submitted."""
    now = time.time()
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(now))}.{int(now % 1 * 1000):03d}"


def pick_launcher(args):
    if args.launcher != "auto":
        if args.launcher == "slurm" and not shutil.which("sbatch"):
            raise utils.ProjectError("--launcher slurm: sbatch is not on the PATH; run on a "
                                     "Slurm login node, or use --launcher local", exit_code=2)
        return args.launcher
    return "slurm" if shutil.which("sbatch") else "local"


def local_concurrency(args, count):
    """(runs at once, torch threads each): one run per core unless --array-parallelism says
    fewer, the cores shared out among them; OMP_NUM_THREADS, where set, caps each run's (two
    processes whose threads outnumber the cores wait on each other: docs/speed.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    at_once = max(1, min(args.array_parallelism or cores, count))
    threads = max(1, cores // at_once)
    with contextlib.suppress(KeyError, ValueError):
        threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    return at_once, threads


def run_locally(todo, args, stop):
    """Run each RunJob (by run name) as local processes, a few at once; return {name: exit
    code} of those that ran. A stop (Ctrl-C, SIGTERM) is passed to the running ones, which save
    and end as main.py does; those not started then are left out. (Not submitit's LocalExecutor:
    it starts every job at once and kills a job a second after passing it Ctrl-C; docs/speed.md.)"""
    at_once, threads = local_concurrency(args, len(todo))
    print(f"running {utils.counted(len(todo), 'run')} on this machine, {at_once} at once with "
          f"{utils.counted(threads, 'torch thread')} each")
    waiting, running, codes = list(todo.items()), {}, {}
    progress = Progress(todo)
    with progress:
        while (waiting and not stop.reason) or running:
            while waiting and len(running) < at_once and not stop.reason:
                name, job = waiting.pop(0)
                job.threads = threads
                running[name] = [job, 0, job.start(job.commands[0]), time.perf_counter()]
                progress.say(f"{name}: started ({utils.counted(len(job.commands), 'command')})")
            for name in list(running):
                if step_local_run(name, running, codes, stop, progress):
                    del running[name]
            progress.update(running)
            time.sleep(0.2)
    return codes


def step_local_run(name, running, codes, stop, progress):
    """Poll one local run; start its next command when one ends well; True once it has ended."""
    job, index, process, started = running[name]
    if stop.reason and not getattr(process, "signalled", False):
        process.send_signal(signal.SIGINT if stop.reason == "SIGINT" else signal.SIGTERM)
        process.signalled = True  # once: main.py saves and ends on the first
    code = process.poll()
    if code is None:
        return False
    if code == 0 and index + 1 < len(job.commands) and not stop.reason:
        running[name][1:3] = [index + 1, job.start(job.commands[index + 1])]
        return False
    codes[name] = code
    progress.say(f"{name}: {how_it_ended(code, job.log)} after "
                 f"{time.perf_counter() - started:.0f} s")
    return True


def how_it_ended(code, log):
    """"finished", or how the run ended with the last line of its log (main.py's own line)."""
    if code == 0:
        return "finished"
    how = "stopped" if code == 130 else f"failed (exit code {code})"
    return f"{how}: {last_line_of(log)} (its log: {log})"


def last_line_of(path):
    with contextlib.suppress(OSError):
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in re.split(r"[\r\n]+", log.read().decode(
                errors="replace")) if line.strip()]
            return lines[-1] if lines else "(its log is empty)"
    return "(no log)"


class Progress:
    """A bar of the epochs the study's runs have trained, read from their logs (on a terminal),
    and a line for each run that starts or ends."""

    def __init__(self, todo):
        self.logs = {name: Path(job.log) for name, job in todo.items()}
        self.offsets = {name: log.stat().st_size if log.exists() else 0
                        for name, log in self.logs.items()}  # what earlier commands wrote
        self.epochs = {}  # (run, model) -> the last epoch its log names
        self.bar = tqdm(total=0, unit="epoch", desc="study", disable=None, mininterval=1)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.bar.close()

    def say(self, line):
        tqdm.write(f"{clock()} {line}")

    def update(self, running):
        for name in running:
            with contextlib.suppress(OSError):
                with open(self.logs[name], "rb") as log:
                    log.seek(self.offsets[name])
                    text = log.read().decode(errors="replace")
                for model, epoch, total in EPOCH_LINE.findall(text):
                    self.epochs[name, model] = (int(epoch), int(total))
        done, total = (sum(values) for values in zip(*self.epochs.values())) \
            if self.epochs else (0, 0)
        self.bar.total = max(total, 1)
        self.bar.n = done
        self.bar.set_postfix_str(", ".join(running), refresh=False)
        self.bar.refresh()


def run_on_slurm(todo, args, study, stop):
    """Submit the RunJobs (by run name) as one Slurm job array through submitit; say the job ids
    and how to watch and cancel them; with --wait (the default), wait for them and return {name:
    exit code}, else None."""
    import submitit

    executor = submitit.SlurmExecutor(folder=study.folder / ".slurm")
    executor.update_parameters(
        job_name=f"study-{study.folder.name}", time=args.time, nodes=1, ntasks_per_node=1,
        setup=[f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        cpus_per_task=args.cpus_per_task, array_parallelism=args.array_parallelism or len(todo),
        **({"partition": args.partition} if args.partition else {}),
        **({"gpus_per_node": args.gpus_per_node} if args.gpus_per_node else {}))
    for job in todo.values():
        job.threads = args.cpus_per_task
    try:
        with executor.batch():
            jobs = {name: executor.submit(job) for name, job in todo.items()}
    except Exception as error:  # sbatch's refusal: submitit raises its output
        raise utils.ProjectError(f"sbatch refused the study's job array: "
                                 f"{utils.first_line(error, 200)}") from None
    array = next(iter(jobs.values())).job_id.split("_")[0]
    for name, job in jobs.items():
        print(f"{name}: Slurm job {job.job_id}, its log {todo[name].log}")
        utils.write_atomically(Path(todo[name].log).parent / "slurm-job",
                               lambda file, job=job: file.write(f"{job.job_id}\n".encode()))
    print(f"{clock()} submitted {utils.counted(len(jobs), 'run')} as Slurm job array {array}: "
          f"watch them with squeue -j {array}, cancel them with scancel {array}")
    if not args.wait:
        return None
    return wait_for_slurm(jobs, todo, array, study, stop)


def wait_for_slurm(jobs, todo, array, study, stop):
    """{name: exit code} once every job of the array has ended; a stop (Ctrl-C) leaves them
    running and says how to go on."""
    progress = Progress(todo)
    codes, started, gone = {}, time.perf_counter(), {}
    with progress:
        while len(codes) < len(jobs):
            if stop.reason:
                raise utils.ProjectError(
                    f"stopped by {stop.reason}; the runs go on in Slurm job array {array} (watch: "
                    f"squeue -j {array}; cancel: scancel {array}); once they end: python "
                    f"studies.py aggregate {study.folder}", exit_code=130)
            queued = jobs_in_queue(array)
            for name, job in jobs.items():
                if name in codes or queued is None or job.job_id in queued:
                    continue
                gone.setdefault(name, time.perf_counter())
                code = slurm_exit_code(job, time.perf_counter() - gone[name])
                if code is not None:
                    codes[name] = code
                    progress.say(f"{name}: {how_it_ended(code, todo[name].log)} (Slurm job "
                                 f"{job.job_id}) after {time.perf_counter() - started:.0f} s")
            progress.update([name for name in jobs if name not in codes])
            time.sleep(1)
    return codes


def jobs_in_queue(array):
    """The ids of the array's jobs that Slurm still holds (pending or running), by squeue: one
    call per poll. (submitit's own job states come from sacct, which needs Slurm's accounting.)"""
    listed = subprocess.run(["squeue", "--noheader", "--array", "--jobs", array, "--format",
                             "%i"], capture_output=True, text=True)
    if listed.returncode and "Invalid job id" not in listed.stderr:
        return None  # squeue failed (the controller is busy): all are taken as still queued
    return set(listed.stdout.split())


def slurm_exit_code(job, seconds_gone):
    """The run's exit code, which the job returned; 1 where the job failed without a result
    (timed out, cancelled, its node lost; the reason in its submitit log); None while its
    result may still be on its way (a shared file system's delay)."""
    if job.paths.result_pickle.exists():
        try:
            return job.result()
        except Exception as error:  # the job raised: said in its submitit log
            print(f"Slurm job {job.job_id}: {utils.first_line(error, 160)} (its submitit log: "
                  f"{job.paths.stderr})")
            return 1
    if seconds_gone < 15:
        return None
    print(f"Slurm job {job.job_id} left the queue without a result (timed out, cancelled or its "
          f"node lost?): see {job.paths.stderr} and {job.paths.stdout}")
    return 1


# ----------------------------------------------------------------------------- running a study

def run_study(args, stop):
    """Check, record and run the study's runs that are not finished, then aggregate and finish
    it; one line naming each run that failed, or how to continue a stopped study."""
    study = study_of(args)
    launcher = pick_launcher(args)
    with study_lock(study.folder):
        todo, queued = runs_to_do(study)
        started = time.perf_counter()
        with stop.polled():  # a signal is passed to the runs, which save and end
            codes = {} if not todo else run_locally(todo, args, stop) if launcher == "local" \
                else run_on_slurm(todo, args, study, stop)
        if codes is None:  # submitted without waiting
            return None
        if todo:
            print(f"{utils.counted(len(codes), 'run')} ended in {time.perf_counter() - started:.0f}"
                  f" s ({launcher})")
        failed = {name: code for name, code in codes.items() if code != 0}
        if stop.reason or any(code == 130 for code in failed.values()):
            raise utils.ProjectError(stopped_line(stop, todo, codes, args), exit_code=130)
        if queued:
            raise utils.ProjectError(queued_line(queued, args))
        result = finish_study(study, args, failed)
    if failed:
        raise utils.ProjectError(failed_line(study, failed))
    return result


def runs_to_do(study):
    """({name: RunJob} of the runs not finished, {name: Slurm job id} of those an earlier
    submission still holds in Slurm's queue, which are never submitted twice); each run's flags
    recorded (or checked against those recorded); says how many are in each state."""
    queued = {run.name: job for run in study.runs for job in [still_queued(run)] if job}
    states = {run.name: "queued" if run.name in queued else run_state(run) for run in study.runs}
    todo = {}
    for run in study.runs:
        record_run(run)
        commands = [] if run.name in queued else commands_of(run, states[run.name])
        if commands:
            todo[run.name] = RunJob([[sys.executable, str(MAIN_SCRIPT), *argv]
                                     for argv in commands], os.getcwd(), str(run.log))
    say_states(states, todo)
    return todo, queued


def still_queued(run):
    """The id of the Slurm job that an earlier submission of this run left pending or running,
    or None."""
    path = run.figure_dir / "slurm-job"
    if not utils.is_file(path) or not shutil.which("squeue"):
        return None
    job_id = path.read_text().strip()
    queued = jobs_in_queue(job_id.split("_")[0])
    return job_id if queued is None or job_id in queued else None


def study_lock(folder):
    """The study folder's lock: one study (or aggregate) at a time writes it."""
    lock = utils.FolderLock(folder)

    @contextlib.contextmanager
    def held():
        try:
            lock.__enter__()
        except utils.ProjectError:
            holder = utils.first_line(Path(folder, ".lock").read_text(), 20) \
                if utils.exists(Path(folder, ".lock")) else "unknown"
            raise utils.ProjectError(f"{folder}/ is in use by another study (process {holder}); "
                                     "wait for it to end or pick another study folder") from None
        try:
            yield
        finally:
            lock.__exit__(None, None, None)
    return held()


def say_states(states, todo):
    counts = {state: sum(value == state for value in states.values())
              for state in ("finished", "stopped", "new", "evaluate", "queued")}
    print(f"{utils.counted(len(states), 'run')}: " + ", ".join(
        f"{count} {state}" for state, count in counts.items() if count)
          + ("" if todo else "; nothing to run"))


def stopped_line(stop, todo, codes, args):
    unfinished = [name for name in todo if codes.get(name) != 0]
    return (f"stopped by {stop.reason or 'a signal to its runs'}; {len(codes) - len(unfinished)} "
            f"of {utils.counted(len(todo), 'run')} finished, the others' checkpoints are kept ("
            f"{', '.join(unfinished)}); continue with: {shlex.join(args.command)}")


def queued_line(queued, args):
    arrays = " ".join(dict.fromkeys(job.split("_")[0] for job in queued.values()))
    return (f"{utils.counted(len(queued), 'run')} of an earlier submission still in Slurm's queue "
            f"({', '.join(f'{name}: job {job}' for name, job in queued.items())}): watch them "
            f"with squeue -j {arrays.replace(' ', ',')}; once they end: {shlex.join(args.command)}")


def failed_line(study, failed):
    logs = {run.name: run.log for run in study.runs}
    named = "; ".join(f"{name} (exit code {code}): see {logs[name]}"
                      for name, code in failed.items())
    return (f"{utils.counted(len(failed), 'run')} failed: {named}; the others' results are "
            "kept; fix the cause and run the same command again")


def finish_study(study, args, failed):
    """The aggregate over the finished runs, then the study's own outputs (latent, comparison)."""
    finished = [run for run in study.runs if run.name not in failed]
    if not finished:
        return None
    if study.finish is not None:
        if failed:
            return None  # the latent table and the comparison want every run
        return study.finish(study, args)
    return write_aggregate(study.folder, [run.figure_dir for run in finished])


def write_latent_study(study, args):
    results = {}
    for run in study.runs:
        results[int(run.name.removeprefix("latent-"))] = utils.load_json(
            run.figure_dir / "metrics.json")
    with_figures = main_args(study.runs[0].argv()).figures
    return report.write_study(study.folder, results, figures=with_figures)


def write_comparison(study, args):
    """main.py --compare, in a process of its own as the runs were, on the runs' data."""
    data_dir = main_args(study.runs[0].argv()).data_dir
    argv = [sys.executable, str(MAIN_SCRIPT), "--compare", "--checkpoint-dir",
            str(args.checkpoint_dir), "--figure-dir", str(args.figure_dir), "--data-dir", data_dir]
    code = subprocess.run(argv).returncode
    if code:
        raise utils.ProjectError(f"{shlex.join(['python', *argv[1:]])} failed (exit code "
                                 f"{code}; its line above)", exit_code=code)
    return utils.load_json(study.folder / "comparison.json")


# ------------------------------------------------------------------------------------ the aggregate

HEADLINES = [  # (row, where the VAE's number is in metrics.json, where the AE's is): README's table
    ("test loss (nats; VAE -ELBO, AE BCE)", ("vae", "test", "loss"), ("ae", "test", "loss")),
    ("test BCE (nats)", ("vae", "test", "bce"), ("ae", "test", "bce")),
    ("test KL to the prior (nats)", ("vae", "test", "kl"), None),
    ("test -log p(x), IWAE bound (nats)", ("vae", "test_nll_iwae", "nats"), None),
    ("reconstruction PSNR (dB)", ("vae", "reconstruction", "psnr"),
     ("ae", "reconstruction", "psnr")),
    ("reconstruction SSIM", ("vae", "reconstruction", "ssim"), ("ae", "reconstruction", "ssim")),
    ("5-NN digit accuracy of the codes", ("vae", "latent", "knn5_accuracy"),
     ("ae", "latent", "knn5_accuracy")),
    ("KL(Gaussian fitted to the codes ‖ N(0, I)) (nats)",
     ("vae", "latent", "aggregate_codes", "gaussian_kl_to_prior"),
     ("ae", "latent", "aggregate_codes", "gaussian_kl_to_prior")),
    *[(f"z ~ N(0, I): {title}", ("samples", "VAE, z ~ N(0, I)", key),
       ("samples", "AE, z ~ N(0, I)", key)) for key, title in (
        ("frechet_distance", "Frechet distance"), ("confident_share", "confident share"),
        ("class_entropy_bits", "class entropy (bits)"))],
    *[(f"z ~ Gaussian fitted to the AE's codes: {title}", None,
       ("samples", "AE, z ~ Gaussian fitted to its training codes", key)) for key, title in (
        ("frechet_distance", "Frechet distance"), ("confident_share", "confident share"),
        ("class_entropy_bits", "class entropy (bits)"))],
    ("interpolation: midpoints' Frechet distance",
     ("interpolation", "VAE", "midpoint_frechet_distance", "mean"),
     ("interpolation", "AE", "midpoint_frechet_distance", "mean")),
    ("interpolation: evenness", ("interpolation", "VAE", "evenness", "mean"),
     ("interpolation", "AE", "evenness", "mean")),
]
AGGREGATE_NOTES = ("Each number of the runs' metrics.json over the runs that differ only in seed "
                   "(a group): mean, sd (the sample standard deviation, n - 1 in its denominator; "
                   "null for one run), n (the runs that have the number), min and max; a list's "
                   "numbers one by one; text kept where every run has the same.")


def run_folders_in(folder):
    """The run folders of a study folder: its subfolders with a metrics.json, in natural order
    (seed-2 before seed-10)."""
    found = [path.parent for path in Path(folder).glob("*/metrics.json")]
    return sorted(found, key=lambda path: [int(part) if part.isdigit() else part
                                           for part in re.split(r"(\d+)", path.name)])


def read_runs(folders):
    """{name: metrics} of each run folder's metrics.json, all of one dataset."""
    runs, datasets = {}, {}
    for folder in folders:
        scores = utils.load_json(Path(folder) / "metrics.json")
        if not isinstance(scores, dict) or not any(isinstance(scores.get(kind), dict)
                                                   for kind in MODEL_NAMES):
            raise utils.ProjectError(f"{folder}/metrics.json is no run's metrics (no VAE or AE "
                                     "in it): move it out of the study folder", exit_code=2)
        runs[Path(folder).name] = scores
        datasets.setdefault(scores.get("dataset"), folder)
    if len(datasets) > 1:
        (one, first), (other, second) = list(datasets.items())[:2]
        raise utils.ProjectError(f"{first}/ holds a run on {one}, {second}/ one on {other}: an "
                                 "aggregate sums up runs of one dataset; move one of them out of "
                                 "the study folder", exit_code=2)
    return runs


def setting_of(scores):
    """What a run's numbers depend on but its seed: the dataset, the sample counts, each model's
    config, training flags and epochs."""
    setting = {"dataset": scores.get("dataset"), "quality_samples": scores.get("quality_samples")}
    for kind in MODEL_NAMES:
        model = scores.get(kind)
        if isinstance(model, dict):
            setting[kind] = {"config": model.get("config"), "epochs": model.get("epochs"),
                             "flags": {flag: value for flag, value in
                                       (model.get("flags") or {}).items() if flag != "seed"},
                             "iwae_samples": (model.get("test_nll_iwae") or {}).get("samples")}
    return setting


def group_runs(runs):
    """[(label, setting, [names])]: the runs grouped by setting; the label names what differs
    between the groups ("all runs" for one)."""
    groups = {}
    for name, scores in runs.items():
        setting = setting_of(scores)
        groups.setdefault(json.dumps(setting, sort_keys=True), (setting, []))[1].append(name)
    flat = [dict(flatten(setting)) for setting, _ in groups.values()]
    differing = [key for key in dict.fromkeys(key for leaves in flat for key in leaves)
                 if len({json.dumps(leaves.get(key)) for leaves in flat}) > 1]
    labelled = []
    for (setting, names), leaves in zip(groups.values(), flat):
        words = dict.fromkeys(f"{key.split('.')[-1]} {leaves.get(key)}" for key in differing)
        labelled.append((", ".join(words) or "all runs", setting, names))
    return labelled


def flatten(tree, prefix=""):
    """(dotted key, value) of each leaf of nested dicts."""
    if not isinstance(tree, dict):
        yield prefix, tree
        return
    for key, value in tree.items():
        yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summarize(values):
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "min": min(values), "max": max(values)}


def aggregate_tree(trees):
    """The runs' metrics (nested dicts and lists) in one: each number a summary over the runs,
    a list's numbers one by one, text kept where every run has the same (else left out: None)."""
    if all(isinstance(tree, dict) for tree in trees):
        merged = {}
        for key in dict.fromkeys(key for tree in trees for key in tree):
            summary = aggregate_tree([tree[key] for tree in trees if key in tree])
            if summary is not None:
                merged[key] = summary
        return merged
    if all(is_number(tree) for tree in trees):
        return summarize(trees)
    if all(isinstance(tree, list) for tree in trees) and len({len(tree) for tree in trees}) == 1:
        return [aggregate_tree(list(column)) for column in zip(*trees)]
    return trees[0] if all(tree == trees[0] for tree in trees) else None


def aggregate_runs(runs):
    """The aggregate of the runs ({name: metrics}): per group of runs that differ only in seed,
    every number's mean, sd, n, min and max."""
    groups = []
    for label, setting, names in group_runs(runs):
        seeds = sorted({seed for name in names for kind in MODEL_NAMES
                        for seed in [((runs[name].get(kind) or {}).get("flags") or {}).get("seed")]
                        if seed is not None})
        groups.append({"label": label, "runs": names, "seeds": seeds, "setting": setting,
                       "metrics": aggregate_tree([runs[name] for name in names])})
    return {"dataset": next(iter(runs.values())).get("dataset"), "notes": AGGREGATE_NOTES,
            "groups": groups}


def write_aggregate(folder, run_folders):
    """STUDY_DIR/metrics.json, study.md and study.png from the runs' metrics.json; returns the
    aggregate."""
    folder = Path(folder)
    target = folder / "metrics.json"
    if utils.is_file(target) and "groups" not in utils.load_json(target):
        raise utils.ProjectError(f"{target} is a run's metrics, not a study's: aggregate a folder "
                                 "whose subfolders are the runs", exit_code=2)
    runs = read_runs(run_folders)
    aggregate = aggregate_runs(runs)
    utils.save_json(target, aggregate)
    table = aggregate_markdown(aggregate, folder)
    utils.write_atomically(folder / "study.md", lambda file: file.write(table.encode()))
    plot_spread(aggregate, runs, folder / "study.png")
    print(headline_table(aggregate["groups"][0]) if len(aggregate["groups"]) == 1 else
          f"{len(aggregate['groups'])} settings: see study.md")
    print(f"metrics.json, study.md and study.png written to {folder}/")
    return aggregate


def number_at(scores, path):
    for key in path:
        if not isinstance(scores, dict) or key not in scores:
            return None
        scores = scores[key]
    return scores if is_number(scores) else None


def leaf(tree, path):
    for key in path or ():
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree if isinstance(tree, dict) and "mean" in tree else None


def formatted(value, decimals=None):
    """A number to `decimals` places; by default 2 from 10 up, 3 from 1, else 4."""
    if value is None:
        return "-"
    if decimals is None:
        decimals = 2 if abs(value) >= 10 else 3 if abs(value) >= 1 else 4
    return f"{value:.{decimals}f}"


def spread_cell(summary, with_range=True):
    """'mean ± sd [min, max]', the sd to two significant digits and the others to its last one
    (one run: its number)."""
    if summary is None:
        return ""
    if summary["n"] == 1 or not summary["sd"]:
        return formatted(summary["mean"])
    decimals = max(0, 1 - math.floor(math.log10(summary["sd"])))
    text = f"{formatted(summary['mean'], decimals)} ± {formatted(summary['sd'], decimals)}"
    return text + (f" [{formatted(summary['min'], decimals)}, "
                   f"{formatted(summary['max'], decimals)}]") * with_range


def headline_table(group):
    """The README's numbers of one group, a column per model: mean ± sd [min, max]."""
    lines = ["| | VAE | AE |", "|---|---|---|"]
    for row, vae_path, ae_path in HEADLINES:
        vae, ae = leaf(group["metrics"], vae_path), leaf(group["metrics"], ae_path)
        if vae or ae:
            lines.append(f"| {row} | {spread_cell(vae)} | {spread_cell(ae)} |")
    return "\n".join(lines)


def aggregate_markdown(aggregate, folder):
    """study.md: per group, its headline table and a row for every number."""
    parts = [f"# The study in {folder}", "", AGGREGATE_NOTES + " Cells: mean ± sd [min, max]."]
    for group in aggregate["groups"]:
        parts += ["", f"## {group['label']}: {utils.counted(len(group['runs']), 'run')} "
                  f"(seeds {seed_list(group)})", "", f"Runs: {', '.join(group['runs'])}.", "",
                  headline_table(group), "", "Every number (lists in metrics.json):", "",
                  "| number | mean | sd | n | min | max |", "|---|---|---|---|---|---|"]
        for key, summary in summaries(group["metrics"]):
            parts.append(f"| {key} | {formatted(summary['mean'])} | {formatted(summary['sd'])} | "
                         f"{summary['n']} | {formatted(summary['min'])} | "
                         f"{formatted(summary['max'])} |")
    return "\n".join(parts) + "\n"


def summaries(tree, prefix=""):
    """(dotted key, summary) of each number of an aggregate's metrics that is no list."""
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and "mean" in value and "n" in value:
            yield name, value
        elif isinstance(value, dict):
            yield from summaries(value, name)


def plot_spread(aggregate, runs, path):
    """study.png: a panel per headline number and model, at its own scale: each run a dot, a
    column per group of runs, its mean a line and ± one sd a bar."""
    panels = [(f"{model}: {row}", model_path) for row, *paths in HEADLINES
              for model, model_path in zip(("VAE", "AE"), paths)
              if any(leaf(group["metrics"], model_path) for group in aggregate["groups"])]
    columns = 5
    figure = Figure(figsize=(3.4 * columns, 2.6 * math.ceil(len(panels) / columns)),
                    layout="constrained")
    axes = figure.subplots(math.ceil(len(panels) / columns), columns, squeeze=False).ravel()
    for ax, (title, model_path) in zip(axes, panels):
        for x, group in enumerate(aggregate["groups"]):
            summary = leaf(group["metrics"], model_path)
            if summary is not None:
                values = [number_at(runs[name], model_path) for name in group["runs"]]
                draw_runs(ax, x, [value for value in values if value is not None], summary,
                          "tab:blue" if title.startswith("VAE") else "tab:orange")
        ax.set_xticks(range(len(aggregate["groups"])), [
            group["label"] if len(aggregate["groups"]) > 1 else f"seeds {seed_list(group)}"
            for group in aggregate["groups"]], fontsize=7)
        ax.set_xlim(-0.6, len(aggregate["groups"]) - 0.4)
        ax.set_title(title, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    figure.suptitle(f"{path.parent}: each run a dot, its group's mean a line, ± one standard "
                    "deviation a bar", fontsize=11)
    utils.save_figure(figure, path)


def seed_list(group):
    """"0-4" for seeds 0, 1, 2, 3, 4; else the seeds, comma-separated."""
    seeds = group["seeds"]
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def draw_runs(ax, x, values, summary, color):
    offsets = [0.24 * (i / max(1, len(values) - 1) - 0.5) if len(values) > 1 else 0.0
               for i in range(len(values))]
    ax.scatter([x + offset for offset in offsets], values, s=16, color=color, zorder=3)
    ax.hlines(summary["mean"], x - 0.3, x + 0.3, color="black", linewidth=1)
    if summary["sd"] is not None:
        ax.errorbar(x + 0.3, summary["mean"], yerr=summary["sd"], color="black", capsize=3)


# ---------------------------------------------------------------------------- two studies compared

def compare_studies(folders):
    """Each headline number of two studies of one setting each: the second's mean minus the
    first's, ± the standard error of that difference, sqrt(sd_a^2 / n_a + sd_b^2 / n_b)."""
    groups = []
    for folder in folders:
        runs = read_runs(run_folders_in(folder) or no_runs(folder))
        aggregate = aggregate_runs(runs)
        if len(aggregate["groups"]) > 1:
            raise utils.ProjectError(f"{folder}/ holds runs of {len(aggregate['groups'])} "
                                     "settings: compare studies of one setting each (a grid's "
                                     "runs apart)", exit_code=2)
        groups.append((aggregate["dataset"], aggregate["groups"][0]))
    if groups[0][0] != groups[1][0]:
        raise utils.ProjectError(f"{folders[0]}/ holds runs on {groups[0][0]}, {folders[1]}/ on "
                                 f"{groups[1][0]}: their numbers do not compare", exit_code=2)
    (_, first), (_, second) = groups
    lines = [f"| number | model | {folders[0]} | {folders[1]} | difference ± its standard error |",
             "|---|---|---|---|---|"]
    for row, *paths in HEADLINES:
        for model, path in zip(("VAE", "AE"), paths):
            a, b = leaf(first["metrics"], path), leaf(second["metrics"], path)
            if a and b:
                lines.append(f"| {row} | {model} | {spread_cell(a, False)} (n {a['n']}) | "
                             f"{spread_cell(b, False)} (n {b['n']}) | {difference(a, b)} |")
    table = "\n".join(lines)
    print(table)
    print(f"cells: mean ± sd over the seeds; the difference: {folders[1]} minus {folders[0]}, ± "
          "sqrt(sd_a^2/n_a + sd_b^2/n_b) (none where a study has one run)")
    return table


def difference(a, b):
    change = b["mean"] - a["mean"]
    if a["sd"] is None or b["sd"] is None:
        return f"{change:+.4g}"
    error = math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"])
    return f"{change:+.4g} ± {error:.2g}" + (f" ({abs(change) / error:.1f} se)" if error else "")


def no_runs(folder):
    raise utils.ProjectError(f"{folder}/ holds no run folder with a metrics.json: aggregate "
                             "the folder a study wrote (its --study-dir)", exit_code=2)


# ------------------------------------------------------------------------------------------ main

def main(argv=None):
    with utils.torch_settings_kept():  # main.py's flags are checked through its own parser
        args = parse_args(argv)
        with utils.StopRequest() as stop:
            try:
                return run_command(args, stop)
            except utils.Stopped as stopped:
                stop.saying_the_end()
                print(f"error: stopped by {stopped.signal_name}; nothing of the study is lost; "
                      f"continue with: {shlex.join(args.command)}", file=sys.stderr)
                sys.exit(130)
            except utils.ProjectError as error:
                stop.saying_the_end()
                print(f"error: {error}", file=sys.stderr)
                sys.exit(error.exit_code)


def run_command(args, stop):
    """The study, aggregate or comparison the flags ask for; a bug of this program one line that
    names the report with its traceback."""
    try:
        if args.kind == "aggregate":
            with study_lock(args.study_dir):
                folders = run_folders_in(args.study_dir) or no_runs(args.study_dir)
                return write_aggregate(args.study_dir, folders)
        if args.kind == "compare":
            return compare_studies(args.study_dirs)
        return run_study(args, stop)
    except (utils.ProjectError, utils.Stopped, BrokenPipeError):
        raise
    except Exception as error:
        import torch
        where = getattr(args, "study_dir", None) or getattr(args, "figure_dir", None) or "."
        report_path = utils.write_error_report(error, where, args.kind, torch.device("cpu"))
        raise utils.ProjectError(f"{type(error).__name__} ({utils.first_line(error, 100)}): a bug "
                                 f"of studies.py; please report it with {report_path} (its "
                                 "traceback)") from None


if __name__ == "__main__":
    with utils.script_streams():  # a closed pipe, a full disk under stdout: never a traceback
        main()
