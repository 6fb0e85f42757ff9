"""Train a VAE and a plain autoencoder (AE) on MNIST side by side, then score both and draw figures.

    python main.py            # train both models (30 epochs), write checkpoints/ and figures/
    python main.py --eval     # rebuild every figure and figures/metrics.json from checkpoints/
    python main.py --help     # the flags, in groups

Read it top to bottom: the flags; main() and run(); training (train_models, fit, train_epoch: the
textbook loop). The models and their losses are in models.py; what the loop calls (schedules,
batches, the discriminator's step) in training.py; the scores, figures and summary of a run in
report.py; the folders and what their checkpoints decide in run_folders.py.
"""
import time

STARTED = time.perf_counter()  # before the imports below, so that the table of phases shows them

import os
import signal


def stopped_before_the_run(number, frame):
    """A Ctrl-C or SIGTERM before the run has begun (torch takes a second or two to import):
    one line, exit code 130; nothing was written."""
    try:
        os.write(2, f"error: stopped by {signal.Signals(number).name} before the run began; "
                    "nothing was written\n".encode())
    finally:
        os._exit(130)


if __name__ == "__main__":  # run as a script, from its first instant
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, stopped_before_the_run)

import argparse
import gc
import math
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint_files
import metrics
import report
import run_folders
import training
import utils
from checkpoint_files import MODEL_FLAGS
from models import ARCHITECTURES, CONDITIONS, MODEL_NAMES, OBJECTIVES, ModelConfig, build_model

IMPORT_SECONDS = time.perf_counter() - STARTED
EVOLUTION_IMAGES = 1000  # test images whose codes each epoch keeps, for latent_evolution.gif


# ------------------------------------------------------------------------------------------- flags

def parse_args(argv=None):
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.latent_study:  # a study now: each size a process of its own, run by studies.py
        parser.error("--latent-study moved to studies.py: python studies.py latent --sizes "
                     f"{' '.join(map(str, args.latent_study))} --checkpoint-dir "
                     f"{args.checkpoint_dir} --figure-dir {args.figure_dir} -- [the other flags]")
    if args.eval and args.resume:
        parser.error("--eval and --resume exclude each other: --eval trains nothing")
    if args.slim and not args.eval:
        parser.error("--slim needs --eval: it slims the checkpoints --eval has just read")
    if args.binarize != "none" and (args.perceptual_weight > 0 or args.adversarial_weight > 0):
        parser.error(f"--binarize {args.binarize} with --perceptual-weight or "
                     "--adversarial-weight: those terms compare grey decodes with the training "
                     "images, which --binarize makes 0 or 1; use --binarize none with them")
    if args.objective == "elbo" and (args.k or 1) > 1:
        parser.error(f"--k {args.k} needs --objective iwae: the ELBO draws one z per image")
    if args.objective == "iwae" and (args.perceptual_weight > 0 or args.adversarial_weight > 0):
        parser.error("--objective iwae with --perceptual-weight or --adversarial-weight: those "
                     "terms compare one decode per image; use --objective elbo with them")
    args.k = args.k or (5 if args.objective == "iwae" else 1)
    try:
        utils.pick_device(args.device)  # before any data is read or torch starts its threads
    except utils.ProjectError as error:
        parser.error(f"argument --device: {error}")
    args.argv = [word for word in argv if word != "--resume"]  # for the command that resumes it
    args.given = sorted(given_flags(argv))
    if args.models is not None:
        args.models = list(dict.fromkeys(args.models))  # drop repeats; None: decided per run folder
    return args


def build_parser():
    parser = OneLineErrorParser(formatter_class=HelpFormatter, description="Train a VAE and a "
                                "plain autoencoder on MNIST; compare them in figures and metrics.")
    add_model_flags(parser.add_argument_group("model"))
    add_training_flags(parser.add_argument_group("training"))
    add_output_flags(parser.add_argument_group("data and output"))
    add_scoring_flags(parser.add_argument_group("scoring"))
    return parser


def given_flags(argv):
    """The flags the command line names (their dests), whatever their values."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # a flag not given is then left out
    return set(vars(parser.parse_args(argv)))


def add_model_flags(group):
    group.add_argument("--latent-dim", metavar="N", type=number(int, 1), default=20,
                       help="size of the code z")
    group.add_argument("--hidden-dim", metavar="N", type=number(int, 1), default=400,
                       help="width of each hidden layer")
    group.add_argument("--hidden-layers", metavar="N", type=number(int, 1), default=1,
                       help="hidden layers in the encoder and in the decoder (--arch mlp)")
    group.add_argument("--arch", choices=ARCHITECTURES, default="mlp",
                       help="an MLP; conv: two stride-2 convolutions and their transposes; "
                            "resnet: down, middle (with self-attention at 7x7) and up blocks of "
                            "residual blocks, --hidden-dim the linear layer to and from the code")
    group.add_argument("--beta", type=number(float, 0, above=True), default=1.0,
                       help="weight of the KL term in the VAE's training loss (1: the ELBO)")
    group.add_argument("--objective", choices=OBJECTIVES, default="elbo",
                       help="the VAE's training loss: elbo, the negative ELBO with one z per "
                            "image; iwae, the negative IWAE bound with --k draws of z per image "
                            "(Burda et al. 2015). The test losses stay the ELBO; the AE ignores it")
    group.add_argument("--k", metavar="K", type=number(int, 1),
                       help="draws of z per image for --objective iwae (default: 5 with iwae; "
                            "1 is the ELBO itself)")
    group.add_argument("--condition", choices=CONDITIONS, default="none",
                       help="label: a conditional VAE and AE, whose encoder sees the image and its "
                            "label and whose decoder the code and the label (one-hot, beside "
                            "them): ask either for the digit of your choice")


def add_training_flags(group):
    group.add_argument("--epochs", metavar="N", type=number(int, 1), default=30,
                       help="passes over the training set (with --resume: the new total)")
    group.add_argument("--batch-size", metavar="N", type=number(int, 1), default=128,
                       help="images per optimizer step")
    group.add_argument("--lr", type=number(float, 0, above=True), default=1e-3,
                       help="Adam's learning rate")
    group.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                       help="cosine: anneal the learning rate to 0 over --epochs")
    group.add_argument("--kl-warmup", type=number(float, 0), default=0.0, metavar="EPOCHS",
                       help="raise the VAE's KL weight from 0 to --beta over this many epochs")
    group.add_argument("--binarize", choices=["none", "dynamic", "static"], default="none",
                       help="none: grey pixels as Bernoulli targets (the classic tutorials); "
                            "dynamic: each training pixel resampled as a Bernoulli whenever it is "
                            "seen (the likelihood literature); static: binarized once. The test "
                            "set is binarized once, with a fixed seed.")
    group.add_argument("--perceptual-weight", metavar="W", type=number(float, 0), default=0.0,
                       help="add W times the squared distance between a small CNN's features of "
                            "the decode and of the image (the CNN trained once per dataset, cached "
                            "in checkpoints/perceptual-DATASET.pt; never the scoring one); 0: off")
    group.add_argument("--adversarial-weight", metavar="W", type=number(float, 0), default=0.0,
                       help="add W times a PatchGAN discriminator's term -mean D(decode), scaled "
                            "by the adaptive ratio of gradient norms at the decoder's last layer; "
                            "the discriminator trains on the hinge loss; 0: off")
    group.add_argument("--adversarial-start", metavar="EPOCHS", type=number(int, 0), default=0,
                       help="epochs trained before the adversarial term and the discriminator "
                            "start")
    group.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16: each step's forward pass under bfloat16 autocast; weights, "
                            "Adam, the loss and all scoring stay fp32 (README, Speed)")
    group.add_argument("--seed", metavar="N", type=int, default=0,
                       help="seeds the weights, the batch order and all sampling")
    group.add_argument("--device", metavar="NAME", default="auto",
                       help="cpu, cuda, cuda:N or mps; auto: CUDA, then MPS, then the CPU")
    group.add_argument("--resume", action="store_true",
                       help="continue from the checkpoints (weights, Adam, random states, "
                            "history) up to --epochs in total, with their model and training "
                            "flags: a model flag that differs is an error, a training flag "
                            "that differs is named in a note")


def add_output_flags(group):
    group.add_argument("--dataset", choices=list(utils.DATASETS), default="mnist",
                       help="MNIST digits or Fashion-MNIST clothes (--eval and --resume use the "
                            "checkpoints' own)")
    group.add_argument("--data-dir", metavar="DIR", default="data", type=folder,
                       help="folder with the four IDX files (.gz or not, flat or in torchvision's "
                            "MNIST/raw layout); torchvision downloads them there if none is found")
    group.add_argument("--checkpoint-dir", metavar="DIR", default="checkpoints", type=folder,
                       help="where vae.pt and ae.pt are written")
    group.add_argument("--figure-dir", metavar="DIR", default="figures", type=folder,
                       help="where the figures and metrics.json are written")
    group.add_argument("--models", nargs="+", choices=list(MODEL_NAMES),
                       help="which models to train (default: both) or evaluate (default: those "
                            "with a checkpoint)")
    group.add_argument("--no-figures", dest="figures", action="store_false",
                       help="given: write metrics.json but no figure (a study's runs; --eval "
                            "draws them later); without it every figure is drawn")
    group.add_argument("--latent-study", nargs="+", type=number(int, 1), metavar="SIZE",
                       help="moved to studies.py (python studies.py latent --sizes SIZE ...), "
                            "which runs each size in a process of its own; refused here")


def add_scoring_flags(group):
    group.add_argument("--eval", action="store_true",
                       help="no training: rebuild the models from their checkpoints' configs, "
                            "write the figures and metrics; model and training flags that differ "
                            "from the checkpoints' are named in a note")
    group.add_argument("--slim", action="store_true",
                       help="with --eval: then rewrite each checkpoint with only what --eval "
                            "reads for the scores and the still figures (no optimizer states, "
                            "no discriminator, no codes for latent_evolution.gif), to commit it; "
                            "--resume refuses a slimmed checkpoint")
    group.add_argument("--compare", action="store_true",
                       help="no training or scoring: draw FIGURE_DIR/comparison/comparison.png and "
                            "write comparison.json from CHECKPOINT_DIR/{vae,ae}.pt and each "
                            "CHECKPOINT_DIR/comparison/NAME/vae.pt, with the metrics.json their "
                            "--eval wrote in FIGURE_DIR and FIGURE_DIR/comparison/NAME")
    group.add_argument("--nll-samples", metavar="K", type=number(int, 1),
                       help=f"importance samples per test image for the VAE's IWAE bound on "
                            f"-log p(x) (default: {report.DEFAULT_NLL_SAMPLES}; --eval keeps the "
                            "count of the metrics.json it replaces; 5000 as in Burda et al. 2015)")
    group.add_argument("--quality-samples", metavar="N", default=10_000,
                       type=number(int, 129, why=" (more than the classifier's 128 features)"),
                       help="samples decoded from each sampler for the sample scores")


def number(kind, minimum, *, above=False, why=""):
    """argparse type: a finite int or float (`kind`) of at least `minimum` (more, if `above`)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            bound = f"more than {minimum}" if above else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}{why}, got {text}")
        return value
    return parse


def folder(text):
    """argparse type: a folder's path, each of whose names the file system takes."""
    problem = utils.path_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see python main.py --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": the help says what happens then;
        if action.default is None or isinstance(action.default, bool):  # a switch says what it does
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------- the run

def main(argv=None):
    with utils.torch_settings_kept():  # for a shell or a test that goes on after the run
        return run_command(argv)


def run_command(argv):
    """main(): the run of one command line, its errors one line each."""
    args = parse_args(argv)
    phases = utils.Phases(IMPORT_SECONDS)
    # run as a script, a signal once the run has said how it ended is ignored while the process
    # exits with the run's code; the start-up handler's line would be a second one, and false
    as_script = signal.getsignal(signal.SIGINT) is stopped_before_the_run
    with utils.StopRequest(afterwards=signal.SIG_IGN if as_script else None) as stop:
        try:
            with run_folders.one_line_errors(args, phases):
                results = run(args, phases, stop)
        except utils.ProjectError as error:
            stop.saying_the_end()
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)
        stop.saying_the_end()
        print(phases.table())
    return results


def run(args, phases, stop):
    """Check the checkpoints, read the data, then for each run folder: train (unless --eval),
    score and draw (report.py). Returns the metrics."""
    parser = build_parser()
    if args.compare:
        return report.compare_runs(args, phases, parser)
    with phases("loading the checkpoints"):  # a missing or bad one fails before the data is read
        runs = [run_folders.open_run(args, parser)]
    dataset = run_folders.dataset_of(args, runs)
    device = utils.pick_device(args.device)
    utils.use_device(device)
    resumed = {model.flags["precision"] for run in runs for model in run.saved.values()}
    if not args.eval and "bf16" in {args.precision} | resumed:
        utils.check_bf16(device)
    with phases("reading the data"):
        data = utils.load_data(args.data_dir, dataset, device)
    for model in (model for run in runs for model in run.saved.values()):
        model.model.to(device)  # what --eval scores and --resume continues, read on the CPU
    with run_folders.locked(runs, args.eval):
        for run in runs:
            saved = run.saved if args.eval else train_models(run.args, run.saved, data, device,
                                                             phases, stop, dataset)
            results = report.report(saved, data, dataset, run.args, phases)
            report.print_summary(results, run.args)
            if args.slim:
                report.slim_checkpoints(saved)
    return results


# ---------------------------------------------------------------------------------------- training

@dataclass
class Trainee:
    """One model in training, with what its checkpoint stores besides the model."""
    kind: str
    path: Path
    config: ModelConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    order: torch.Generator  # the batch order
    draws: torch.Generator  # the VAE's z and binarized pixels: each model its own
    flags: dict  # the flags it trains with: this run's, or the checkpoint's when resuming
    history: list
    checkpoint: dict = None  # the last one saved, or the one resumed from: it holds the live
    # weights and Adam's live moments (not a snapshot), so it is only read right after a save
    objective: torch.nn.Module = None  # what the loop trains: the model, or a TrainingObjective
    discriminator_step: training.DiscriminatorStep = None  # with --adversarial-weight


def train_models(args, saved, data, device, phases, stop, dataset):
    """Train each model of args.models, continuing its saved model if there is one; return
    {kind: SavedModel} of the trained models. The VAE and the AE train side by side, each in a
    thread, on a CPU with half of torch's threads, on a GPU with a CUDA stream of its own: one
    small model leaves the device idle between its many short operations, and the other fills
    it (README, Speed). Each draws from its own generators."""
    with phases("building the models"):
        trainees = [start_training(kind, args, saved.get(kind), device) for kind in args.models]
    for trainee in trainees:
        perceptual = metrics.perceptual_network(dataset, data, phases).to(device) \
            if trainee.flags["perceptual_weight"] > 0 else None
        trainee.objective, trainee.discriminator_step = training.training_objective(
            trainee.model, trainee.flags, device, perceptual)
        if trainee.discriminator_step and trainee.checkpoint:
            trainee.discriminator_step.restore(trainee.checkpoint, trainee.path)
    jobs = {trainee.kind: partial(fit, trainee, args, data, stop, position)
            for position, trainee in enumerate(trainees)}
    with phases("training"), stop.polled():
        if len(jobs) == 1 or device.type == "mps" or (device.type == "cpu"
                                                      and torch.get_num_threads() < 2):
            return {kind: job() for kind, job in jobs.items()}
        return utils.side_by_side(jobs, stop, device)


def start_training(kind, args, saved, device):
    """A new model, its weights drawn from --seed, with its optimizer and generators; or the
    saved one, continued with the flags it trained with."""
    if saved is not None:
        return resume_training(saved, args, device)
    torch.manual_seed(args.seed)  # each model's initial weights from the seed, whichever is first
    config = ModelConfig(kind=kind, **{flag: getattr(args, flag) for flag in MODEL_FLAGS})
    model = build_model(config).to(device)
    order, draws = training.model_generators(args.seed, device)
    return Trainee(kind, checkpoint_files.checkpoint_path(args.checkpoint_dir, kind), config,
                   model, utils.make_optimizer(model, args.lr, device), order, draws,
                   flags={key: value for key, value in vars(args).items() if key != "given"},
                   history=[])


def resume_training(saved, args, device):
    if "optimizer" not in saved.checkpoint:
        raise utils.ProjectError(f"{saved.path} was slimmed for --eval (it holds no optimizer "
                                 "state): --resume cannot continue it; train afresh into another "
                                 "--checkpoint-dir", exit_code=2)
    model, flags = saved.model, saved.flags
    optimizer = utils.make_optimizer(model, flags["lr"], device)
    order, draws = training.model_generators(flags["seed"], device)
    training.restore_training_state(saved.checkpoint, saved.path, optimizer,
                                    {"order": order, "draws": draws}, device)
    history = saved.checkpoint["history"]
    print(f"{MODEL_NAMES[saved.kind]}: resuming {saved.path} after epoch {len(history)} (its lr, "
          f"batch size and seed; --epochs {args.epochs} is the new total)")
    return Trainee(saved.kind, saved.path, saved.config, model, optimizer, order, draws, flags,
                   list(history), saved.checkpoint)


def fit(trainee, args, data, stop, bar_position=None):
    """The epoch loop: train, test, checkpoint and print each epoch, from the trainee's next
    one up to --epochs; return the trained model as a SavedModel."""
    name, flags = MODEL_NAMES[trainee.kind], trainee.flags
    train_targets = utils.binarized(data["train"][0], flags["binarize"], "train")
    train_labels = data["train"][1].to(train_targets.device)
    test_targets = utils.binarized(data["test"][0], flags["binarize"], "test")
    if len(trainee.history) >= args.epochs:
        print(f"{name}: {trainee.path} already holds {utils.counted(len(trainee.history), 'epoch')}"
              "; nothing to do")
    for epoch in range(len(trainee.history) + 1, args.epochs + 1):
        started = time.perf_counter()
        lr = training.learning_rate(flags["lr"], flags["lr_schedule"], epoch, args.epochs)
        for group in trainee.optimizer.param_groups:
            group["lr"] = lr
        discriminator_step = discriminator_of_epoch(trainee, epoch)
        try:
            train_parts = train_epoch(
                trainee.objective, trainee.optimizer, train_targets, train_labels,
                batch_size=flags["batch_size"],
                order=trainee.order, draws=trainee.draws, binarize=flags["binarize"],
                kl_range=training.kl_weight_range(epoch, flags["kl_warmup"]), stop=stop,
                precision=flags["precision"], description=f"{name} epoch {epoch}/{args.epochs}",
                bar_position=bar_position, discriminator_step=discriminator_step)
        except training.NonFiniteLoss as failure:
            raise utils.ProjectError(
                f"{name} loss became NaN or infinite in epoch {epoch} by step {failure.step} "
                f"(lr {lr:g}); {checkpoint_files.saved_epochs([trainee.path])}; "
                f"{training.divergence_advice(flags)}") from None
        if train_parts is None:
            raise utils.Stopped(stop.reason)
        trainee.history.append(epoch_record(trainee.model, epoch, train_parts, test_targets,
                                            data["test"], started))
        if discriminator_step is not None:
            trainee.history[-1]["discriminator_loss"] = discriminator_step.mean_loss()
        trainee.checkpoint = checkpoint_of(trainee, args.epochs, test_targets.device)
        checkpoint_files.save_checkpoint(trainee.path, trainee.checkpoint)
        print_epoch(name, trainee.history[-1], args.epochs)
    return checkpoint_files.SavedModel(trainee.kind, trainee.path, trainee.checkpoint,
                                       trainee.config, trainee.model, trainee.flags)


def discriminator_of_epoch(trainee, epoch):
    """The discriminator's step for `epoch` (1-based), or None: it and the model's adversarial
    term start after --adversarial-start epochs."""
    if trainee.discriminator_step is None:
        return None
    trainee.objective.adversarial_on = epoch > trainee.flags["adversarial_start"]
    return trainee.discriminator_step if trainee.objective.adversarial_on else None


def train_epoch(objective, optimizer, targets, labels, *, batch_size, order, draws=None,
                binarize="none", kl_range=(1.0, 1.0), precision="fp32", stop=None, description="",
                bar_position=None, discriminator_step=None):
    """One pass over the training `targets` (N, 784) and their `labels` (N,) in a random order:
    the textbook loop. Returns the mean loss parts per image and their sum as "loss" (the VAE's
    negative ELBO, whatever KL weight it trains with); an unconditional model ignores labels.

    objective: the model, or a TrainingObjective around it. binarize "dynamic" samples each pixel
    of each batch as a Bernoulli of its grey value. kl_range: the share of the KL weight at the
    start and the end of the epoch, raised per step. order, draws: the model's own generators
    for the batch order and for z and pixels. precision "bf16": the forward pass under bfloat16
    autocast. discriminator_step: stepped after the model's step on the decodes it just made.
    Raises NonFiniteLoss if the loss is NaN or infinite; returns None once `stop` is requested.
    """
    objective.train()
    losses = training.EpochLosses(len(targets), batch_size, description, bar_position)
    kl_weights = training.kl_weight_per_step(kl_range, losses.steps)
    batches = training.shuffled_batches(targets, labels, batch_size, order)
    for (batch, batch_labels), kl_weight in zip(batches, kl_weights):
        if binarize == "dynamic":
            batch = torch.bernoulli(batch, generator=draws)  # each pixel a fresh 0 or 1
        with training.autocast(precision, targets.device):
            loss, parts = objective(batch, batch_labels, kl_weight=kl_weight, generator=draws)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if discriminator_step is not None:
            discriminator_step.step(batch, objective.decoded)  # on the decodes it just made
        losses.add(parts, len(batch))
        if stop is not None and stop.reason:
            losses.close()
            return None  # stopped: the caller ends the run
    return losses.means()


def epoch_record(model, epoch, train_parts, test_targets, test, started):
    """What the history keeps of an epoch: its losses, its seconds and, for the GIF, the codes
    of the first test images. The test loss is the one the report gives for these weights.
    test: the test images and labels."""
    utils.wait_for_queued_work(test_targets.device)
    (images, labels), first = test, slice(0, EVOLUTION_IMAGES)
    record = {"epoch": epoch, "train": train_parts, "train_seconds": time.perf_counter() - started,
              "test": metrics.evaluate_loss(model, test_targets, labels)}
    if epoch <= 30 or epoch % 10 == 0:
        record["codes"] = metrics.codes_of(model, images[first], labels[first]).half().cpu()
    return {**record, "epoch_seconds": time.perf_counter() - started}


def checkpoint_of(trainee, epochs, device):
    """What a checkpoint holds: the model's config and weights, and all that --resume needs to
    continue exactly (Adam, the generators, the history, the flags)."""
    return {
        "config": asdict(trainee.config),
        "model": trainee.model.state_dict(),
        "optimizer": trainee.optimizer.state_dict(),
        "epoch": len(trainee.history),
        "history": trainee.history,
        "args": {**trainee.flags, "epochs": epochs},  # its flags, for --resume and --eval
        "rng": {"order": trainee.order.get_state(), "draws": trainee.draws.get_state()},
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        **({"discriminator": trainee.discriminator_step.state()}
           if trainee.discriminator_step else {}),
    }


def print_epoch(name, record, epochs):
    test = record["test"]
    parts = "  ".join(f"{key} {value:.2f}" for key, value in test.items() if key != "loss")
    tqdm.write(f"{name} epoch {record['epoch']:3d}/{epochs}  train {record['train']['loss']:.2f}  "
               f"test {test['loss']:.2f} ({parts})  {record['epoch_seconds']:.1f}s")


if __name__ == "__main__":
    with utils.script_streams():  # a closed pipe, a full disk under stdout: never a traceback
        main()
    gc.freeze()  # Python's exit then skips a garbage collection over torch's objects (0.5 s)
