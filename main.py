"""Train a VAE and a plain autoencoder (AE) on MNIST side by side, then score both and draw figures.

    python main.py            # train both models (30 epochs), write checkpoints/ and figures/
    python main.py --eval     # rebuild every figure and figures/metrics.json from checkpoints/
    python main.py --help     # the flags, in groups

Read it top to bottom: the flags; main() and run(); training (train_models, fit, train_epoch: the
textbook loop); the report (scores from metrics.py, pictures from plots.py); then the helpers.
The models and their losses are in models.py; files, devices and signals in utils.py.
"""
import time

STARTED = time.perf_counter()  # before the imports below, so that the table of phases shows them

import argparse
import contextlib
import gc
import json
import math
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint_files
import metrics
import plots
import utils
from models import Adversary, ModelConfig, TrainingObjective, build_model

IMPORT_SECONDS = time.perf_counter() - STARTED
MODEL_NAMES = {"vae": "VAE", "ae": "AE"}
ARCHITECTURES = ["mlp", "conv", "resnet"]
MODEL_FLAGS = ["latent_dim", "hidden_dim", "hidden_layers", "arch", "beta"]  # a checkpoint's config
OBJECTIVE_FLAGS = ["perceptual_weight", "adversarial_weight", "adversarial_start"]  # metrics.json's
TRAINING_FLAGS = ["lr", "batch_size", "seed", "precision", "binarize", "kl_warmup", "lr_schedule",
                  *OBJECTIVE_FLAGS]
DEFAULT_NLL_SAMPLES = 100
EVOLUTION_IMAGES = 1000  # test images whose codes each epoch keeps, for latent_evolution.gif
MEMORY_FLAGS = {  # the flags that size what a phase allocates, named when it runs out of memory
    "building the models": ["hidden_dim", "hidden_layers", "latent_dim"],
    "training": ["batch_size", "hidden_dim"],
    "scoring samples": ["quality_samples"],
}


# ------------------------------------------------------------------------------------------- flags

def parse_args(argv=None):
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.eval and args.resume:
        parser.error("--eval and --resume exclude each other: --eval trains nothing")
    if args.slim and not args.eval:
        parser.error("--slim needs --eval: it slims the checkpoints --eval has just read")
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
    group.add_argument("--data-dir", metavar="DIR", default="data",
                       help="folder with the four IDX files (.gz or not, flat or in torchvision's "
                            "MNIST/raw layout); torchvision downloads them there if none is found")
    group.add_argument("--checkpoint-dir", metavar="DIR", default="checkpoints",
                       help="where vae.pt and ae.pt are written")
    group.add_argument("--figure-dir", metavar="DIR", default="figures",
                       help="where the figures and metrics.json are written")
    group.add_argument("--models", nargs="+", choices=list(MODEL_NAMES),
                       help="which models to train (default: both) or evaluate (default: those "
                            "with a checkpoint)")
    group.add_argument("--latent-study", nargs="+", type=number(int, 1), metavar="SIZE",
                       help="one run per latent size, in CHECKPOINT_DIR/latent-SIZE and "
                            "FIGURE_DIR/latent-SIZE, then latent_study.png and .json to compare")


def add_scoring_flags(group):
    group.add_argument("--eval", action="store_true",
                       help="no training: rebuild the models from their checkpoints' configs, "
                            "write the figures and metrics; model and training flags that differ "
                            "from the checkpoints' are named in a note")
    group.add_argument("--slim", action="store_true",
                       help="with --eval: then rewrite each checkpoint with only what --eval "
                            "reads (no optimizer states, no discriminator), to commit it; "
                            "--resume refuses a slimmed checkpoint")
    group.add_argument("--compare", action="store_true",
                       help="no training or scoring: draw FIGURE_DIR/comparison/comparison.png and "
                            "write comparison.json from CHECKPOINT_DIR/{vae,ae}.pt and each "
                            "CHECKPOINT_DIR/comparison/NAME/vae.pt, with the metrics.json their "
                            "--eval wrote in FIGURE_DIR and FIGURE_DIR/comparison/NAME")
    group.add_argument("--nll-samples", metavar="K", type=number(int, 1),
                       help=f"importance samples per test image for the VAE's IWAE bound on "
                            f"-log p(x) (default: {DEFAULT_NLL_SAMPLES}; --eval keeps the count of "
                            "the metrics.json it replaces; 5000 as in Burda et al. 2015)")
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


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see python main.py --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)": the help says what happens then
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------- the run

def main(argv=None):
    args = parse_args(argv)
    phases = utils.Phases(IMPORT_SECONDS)
    try:
        with utils.StopRequest() as stop, one_line_errors(args, phases):
            results = run(args, phases, stop)
    except utils.ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print(phases.table())
    return results


def run(args, phases, stop):
    """Check the checkpoints, read the data, then for each run folder: train (unless --eval),
    score and draw. Returns the metrics (with --latent-study, the study's table)."""
    if args.compare:
        return compare_runs(args, phases)
    runs = run_folders(args)
    with phases("loading the checkpoints"):  # a missing or bad one fails before the data is read
        saved = [saved_checkpoints(run_args) for run_args in runs]
    for run_args, checkpoints in zip(runs, saved):
        name_decided_flags(run_args, checkpoints)
    dataset = dataset_of(args, saved)
    device = utils.pick_device(args.device)
    resumed = {stored_flags(c)["precision"] for checkpoints in saved for c in checkpoints.values()}
    if not args.eval and "bf16" in {args.precision} | resumed:
        utils.check_bf16(device)
    with phases("reading the data"):
        data = load_data(args.data_dir, dataset, device)
    results = {}
    with contextlib.ExitStack() as locks:
        for folder in written_folders(runs, args.eval):
            locks.enter_context(utils.FolderLock(folder))
        for run_args, checkpoints in zip(runs, saved):
            if not run_args.eval:
                checkpoints = train_models(run_args, checkpoints, data, device, phases, stop,
                                           dataset)
            results[run_args.latent_dim] = report(checkpoints, data, dataset, run_args, phases)
            print_summary(results[run_args.latent_dim], run_args)
            if run_args.slim:
                slim_checkpoints(checkpoints, run_args.checkpoint_dir)
        if not args.latent_study:
            return results[args.latent_dim]
        with phases("drawing the figures"):
            return write_study(args, results)


# ---------------------------------------------------------------------------------------- training

@dataclass
class Trainee:
    """One model in training, with what its checkpoint stores besides the model."""
    kind: str
    path: Path
    config: ModelConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    shuffle: torch.Generator  # the batch order
    noise: torch.Generator  # the VAE's z and binarized pixels: each model its own
    flags: dict  # the training flags: this run's, or the checkpoint's when resuming
    history: list
    checkpoint: dict = None  # the last one saved, or the one resumed from
    objective: torch.nn.Module = None  # what the loop calls: the model, or a TrainingObjective
    critic: "DiscriminatorStep" = None  # the discriminator and its optimizer (--adversarial-weight)


def train_models(args, checkpoints, data, device, phases, stop, dataset="mnist"):
    """Train each model of args.models, continuing its checkpoint if there is one; return
    {kind: last checkpoint}. On a CPU the VAE and the AE train side by side, each in a thread
    with half of torch's threads: one small model leaves the cores idle between its many short
    operations, and the other fills them (README, Speed). Each draws from its own generators."""
    with phases("building the models"):
        trainees = [start_training(kind, args, checkpoints.get(kind), device)
                    for kind in args.models]
    for trainee in trainees:
        attach_objective(trainee, data, dataset, device, phases)
    jobs = {trainee.kind: partial(fit, trainee, args, data, stop, position)
            for position, trainee in enumerate(trainees)}
    with phases("training"), stop.polled():
        if device.type != "cpu" or len(jobs) == 1 or torch.get_num_threads() < 2:
            return {kind: job() for kind, job in jobs.items()}
        return utils.side_by_side(jobs, stop)


def start_training(kind, args, checkpoint, device):
    """A new model, its weights drawn from --seed, with its optimizer and generators; or the
    one `checkpoint` holds."""
    path = checkpoint_files.checkpoint_path(args.checkpoint_dir, kind)
    if checkpoint is not None:
        return resume_training(kind, path, checkpoint, args, device)
    torch.manual_seed(args.seed)  # each model's initial weights from the seed, whichever is first
    config = ModelConfig(kind=kind, latent_dim=args.latent_dim, hidden_dim=args.hidden_dim,
                         arch=args.arch, hidden_layers=args.hidden_layers, beta=args.beta)
    model = build_model(config).to(device)
    shuffle, noise = (torch.Generator(device).manual_seed(args.seed + k) for k in (0, 1))
    return Trainee(kind, path, config, model, make_optimizer(model, args.lr, device), shuffle,
                   noise, flags=vars(args), history=[])


def resume_training(kind, path, checkpoint, args, device):
    if "optimizer" not in checkpoint:
        raise utils.ProjectError(f"{path} was slimmed for --eval (it holds no optimizer state): "
                                 "--resume cannot continue it; train afresh into another "
                                 "--checkpoint-dir", exit_code=2)
    config, model = restore_model(checkpoint, kind, args.checkpoint_dir, device)
    flags = stored_flags(checkpoint)
    optimizer = make_optimizer(model, flags["lr"], device)
    shuffle, noise = (torch.Generator(device).manual_seed(flags["seed"] + k) for k in (0, 1))
    try:
        restore_training_state(checkpoint, model, optimizer, shuffle, noise, device)
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise utils.ProjectError(f"{path}: its optimizer or random state cannot be restored "
                                 f"({utils.first_line(error, 80)}); --eval still evaluates it, "
                                 "or retrain") from None
    print(f"{MODEL_NAMES[kind]}: resuming {path} after epoch {len(checkpoint['history'])} (its lr, "
          f"batch size and seed; --epochs {args.epochs} is the new total)")
    return Trainee(kind, path, config, model, optimizer, shuffle, noise, flags,
                   checkpoint["history"], checkpoint)


def attach_objective(trainee, data, dataset, device, phases):
    """With --perceptual-weight or --adversarial-weight, wrap the model in a TrainingObjective
    (and the discriminator's own step); else the loop trains the bare model, as it always did."""
    flags = trainee.flags
    if not (flags["perceptual_weight"] > 0 or flags["adversarial_weight"] > 0):
        trainee.objective = trainee.model
        return
    perceptual = None
    if flags["perceptual_weight"] > 0:
        perceptual = metrics.perceptual_network(dataset, data, phases).to(device)
    if flags["adversarial_weight"] > 0:
        torch.manual_seed(flags["seed"] + 2)  # the discriminator's weights, after the model's
        trainee.critic = DiscriminatorStep(Adversary().to(device), flags["lr"], device)
        if trainee.checkpoint is not None:
            trainee.critic.restore(trainee.checkpoint, trainee.path)
    trainee.objective = TrainingObjective(
        model=trainee.model, perceptual_weight=flags["perceptual_weight"], perceptual=perceptual,
        adversarial_weight=flags["adversarial_weight"],
        adversary=trainee.critic.adversary if trainee.critic else None)


class DiscriminatorStep:
    """The discriminator's own training: Adam (betas 0.5, 0.9, as in taming-transformers) on the
    hinge loss between a batch of images and the model's decodes of it, detached."""

    def __init__(self, adversary, lr, device):
        self.adversary = adversary
        self.optimizer = make_optimizer(adversary, lr, device, betas=(0.5, 0.9))
        self.total, self.steps = 0.0, 0

    def step(self, real, fake):
        loss = self.adversary.discriminator_loss(real, fake)
        self.optimizer.zero_grad(set_to_none=True)  # also drops what the model's step left
        loss.backward()
        self.optimizer.step()
        self.total, self.steps = self.total + loss.detach(), self.steps + 1

    def mean_loss(self):
        """The mean hinge loss since the last call (None if no step)."""
        mean = (self.total / self.steps).item() if self.steps else None
        self.total, self.steps = 0.0, 0
        return mean

    def state(self):
        return {"model": self.adversary.state_dict(), "optimizer": self.optimizer.state_dict()}

    def restore(self, checkpoint, path):
        state = checkpoint.get("adversary")
        if not isinstance(state, dict) or "model" not in state:
            raise utils.ProjectError(f"{path}: its discriminator is missing, though it trained "
                                     "with --adversarial-weight; retrain")
        problem = checkpoint_files.state_dict_problem(state["model"], self.adversary.state_dict())
        if problem:
            raise utils.ProjectError(f"{path}: its discriminator: {problem}; retrain")
        self.adversary.load_state_dict(state["model"])
        try:  # as resume_training treats the model's own Adam
            checkpoint_files.restore_adam(self.optimizer, state["optimizer"])
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as error:
            raise utils.ProjectError(f"{path}: its discriminator's optimizer cannot be restored "
                                     f"({utils.first_line(error, 80)}); retrain") from None


def restore_training_state(checkpoint, model, optimizer, shuffle, noise, device):
    """Adam's moments and the generators' states, as the checkpoint saved them; raises one of
    the errors resume_training catches where the file holds something else."""
    checkpoint_files.restore_adam(optimizer, checkpoint["optimizer"])
    rng = checkpoint["rng"]
    if torch.device(checkpoint["device"]).type == device.type and "noise" in rng:
        shuffle.set_state(rng["shuffle"])  # generator states are per kind of device
        noise.set_state(rng["noise"])


def fit(trainee, args, data, stop, bar_position=None):
    """The epoch loop: train, test, checkpoint and print each epoch, from the trainee's next
    one up to --epochs; return the last checkpoint."""
    name, flags = MODEL_NAMES[trainee.kind], trainee.flags
    train_targets = utils.binarized(data["train"][0], flags["binarize"], "train")
    test_targets = utils.binarized(data["test"][0], flags["binarize"], "test")
    if len(trainee.history) >= args.epochs:
        print(f"{name}: {trainee.path} already holds {len(trainee.history)} epochs; nothing to do")
    for epoch in range(len(trainee.history) + 1, args.epochs + 1):
        started = time.perf_counter()
        lr = learning_rate(flags["lr"], flags["lr_schedule"], epoch, args.epochs)
        for group in trainee.optimizer.param_groups:
            group["lr"] = lr
        critic = adversary_of_epoch(trainee, epoch)
        try:
            train_parts = train_epoch(
                trainee.objective, trainee.optimizer, train_targets, batch_size=flags["batch_size"],
                shuffle=trainee.shuffle, noise=trainee.noise, binarize=flags["binarize"],
                kl_warmup=kl_warmup_range(epoch, flags["kl_warmup"]), stop=stop,
                precision=flags["precision"], description=f"{name} epoch {epoch}/{args.epochs}",
                bar_position=bar_position, critic=critic)
        except NonFiniteLoss as failure:
            raise utils.ProjectError(
                f"{name} loss became NaN or infinite in epoch {epoch} by step {failure.step} "
                f"(lr {lr:g}); {checkpoint_files.saved_epochs([trainee.path])}; try a lower "
                "--lr") from None
        if train_parts is None:
            raise utils.Stopped(stop.signal_name)
        trainee.history.append(epoch_record(trainee.model, epoch, train_parts, test_targets,
                                            data["test"][0], started))
        if critic is not None:
            trainee.history[-1]["discriminator_loss"] = critic.mean_loss()
        trainee.checkpoint = checkpoint_of(trainee, args.epochs, test_targets.device)
        checkpoint_files.save_checkpoint(trainee.path, trainee.checkpoint)
        print_epoch(name, trainee.history[-1], args.epochs)
    return trainee.checkpoint


def adversary_of_epoch(trainee, epoch):
    """The discriminator's step for `epoch` (1-based), or None: it and the model's adversarial
    term start after --adversarial-start epochs."""
    if trainee.critic is None:
        return None
    trainee.objective.adversarial_on = epoch > trainee.flags["adversarial_start"]
    return trainee.critic if trainee.objective.adversarial_on else None


def train_epoch(model, optimizer, images, *, batch_size, shuffle, noise=None, binarize="none",
                kl_warmup=(1.0, 1.0), precision="fp32", stop=None, description="",
                bar_position=None, critic=None):
    """One pass over `images` (N, 784) in a random order; returns the mean loss parts per image
    and their sum as "loss" (the VAE's negative ELBO, whatever KL weight it trains with).

    binarize "dynamic" samples each pixel of each batch as a Bernoulli of its grey value.
    kl_warmup: the share of the KL weight at the start and the end of the epoch, raised per step.
    noise: the model's own generator. precision "bf16": the forward pass under bfloat16 autocast.
    critic: a DiscriminatorStep, stepped after the model's step on the decodes it just made.
    Raises NonFiniteLoss if the loss is NaN or infinite; returns None once `stop` is requested.
    """
    model.train()
    losses = EpochLosses(len(images), batch_size, description, bar_position)
    kl_weights = kl_weight_per_step(kl_warmup, losses.steps)
    for batch, kl_weight in zip(shuffled_batches(images, batch_size, shuffle), kl_weights):
        if binarize == "dynamic":
            batch = torch.bernoulli(batch, generator=noise)  # each pixel a fresh 0 or 1
        with autocast(precision, images.device):
            loss, parts = model(batch, kl_warmup=kl_weight, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if critic is not None:
            critic.step(batch, model.decoded)  # the discriminator's own step, on these decodes
        losses.add(parts, len(batch))
        if stop is not None and stop.signal_name:
            return losses.close()
    return losses.means()


def shuffled_batches(images, batch_size, shuffle):
    """`images` in an order drawn from the generator `shuffle`, `batch_size` rows at a time."""
    order = torch.randperm(len(images), generator=shuffle, device=images.device)
    return (images[order[start:start + batch_size]] for start in range(0, len(images), batch_size))


def kl_weight_per_step(kl_warmup, steps):
    """The KL weight of each step of an epoch: from kl_warmup[0] to kl_warmup[1], linearly."""
    start, end = kl_warmup
    return [start + (end - start) * step / steps for step in range(1, steps + 1)]


def autocast(precision, device):
    """bf16: the forward pass under bfloat16 autocast; fp32: nothing. A new one each step: it
    keeps its bfloat16 weights until it exits, so one around the epoch would train every step on
    the first step's weights (tried: the loss diverges)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


class EpochLosses:
    """The sums of an epoch's loss parts, shown on a progress bar (in terminals only). Every 50
    steps and at the last it reads the loss, which waits for the device, and raises
    NonFiniteLoss when it is NaN or infinite."""

    def __init__(self, num_images, batch_size, description, bar_position):
        self.num_images, self.steps = num_images, math.ceil(num_images / batch_size)
        self.totals, self.seen, self.step = {}, 0, 0
        self.progress = tqdm(total=self.steps, desc=description, leave=False, mininterval=0.5,
                             position=bar_position, disable=None)

    def add(self, parts, batch_size):
        for name, value in parts.items():
            self.totals[name] = self.totals.get(name, 0.0) + value * batch_size
        self.seen, self.step = self.seen + batch_size, self.step + 1
        self.progress.update()
        if self.step % 50 == 0 or self.seen == self.num_images:
            running_loss = sum(self.totals.values()).item() / self.seen
            if not math.isfinite(running_loss):
                raise NonFiniteLoss(self.step)
            self.progress.set_postfix(loss=f"{running_loss:.2f}")

    def close(self):
        self.progress.close()

    def means(self):
        self.close()
        means = {name: (total / self.seen).item() for name, total in self.totals.items()}
        return {"loss": sum(means.values()), **means}


def epoch_record(model, epoch, train_parts, test_targets, test_images, started):
    """What the history keeps of an epoch: its losses, its seconds and, for the GIF, the codes
    of the first test images. The test loss is the one the report gives for these weights."""
    utils.sync(test_targets.device)
    record = {"epoch": epoch, "train": train_parts, "train_seconds": time.perf_counter() - started,
              "test": metrics.evaluate_loss(model, test_targets)}
    if epoch <= 30 or epoch % 10 == 0:
        record["codes"] = metrics.encode(model, test_images[:EVOLUTION_IMAGES])[0].half().cpu()
    return {**record, "epoch_seconds": time.perf_counter() - started}


def checkpoint_of(trainee, epochs, device):
    return {
        "config": asdict(trainee.config),
        "model": trainee.model.state_dict(),
        "optimizer": trainee.optimizer.state_dict(),
        "epoch": len(trainee.history),
        "history": trainee.history,
        "args": {**{key: value for key, value in trainee.flags.items() if key != "given"},
                 "epochs": epochs},  # its training flags, for --resume and --eval
        "rng": {"shuffle": trainee.shuffle.get_state(), "noise": trainee.noise.get_state()},
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        **({"adversary": trainee.critic.state()} if trainee.critic else {}),
    }


def print_epoch(name, record, epochs):
    test = record["test"]
    parts = "  ".join(f"{key} {value:.2f}" for key, value in test.items() if key != "loss")
    tqdm.write(f"{name} epoch {record['epoch']:3d}/{epochs}  train {record['train']['loss']:.2f}  "
               f"test {test['loss']:.2f} ({parts})  {record['epoch_seconds']:.1f}s")


# ------------------------------------------------------------------------------------- the report

def report(checkpoints, data, dataset, run_args, phases):
    """Rebuild each model from its checkpoint, score it (metrics.py), write metrics.json and
    every figure (plots.py); return the metrics."""
    (train_images, _), (test_images, _) = data["train"], data["test"]
    classifier, accuracy = metrics.scoring_classifier(dataset, data, phases)
    with phases("loading the checkpoints"):
        models = {MODEL_NAMES[kind]: restore_model(checkpoint, kind, run_args.checkpoint_dir,
                                                   test_images.device)[1]
                  for kind, checkpoint in checkpoints.items()}
    nll_samples = nll_samples_for(run_args)
    print(f"scoring {' and '.join(models)}: losses, codes, reconstructions, "
          f"{f'the IWAE bound ({nll_samples} samples), ' if 'VAE' in models else ''}samples ...")
    scores = {"dataset": dataset, "quality_samples": run_args.quality_samples, "classifier": {
        "file": str(metrics.classifier_path(dataset)), "test_accuracy": accuracy}}
    codes = {}
    for kind, checkpoint in checkpoints.items():
        name, binarize = MODEL_NAMES[kind], stored_flags(checkpoint)["binarize"]
        model_scores, codes[name] = metrics.score_model(models[name], binarize, data, phases)
        metrics.require_finite(codes[name], f"the {name}'s codes of the test set", f", after "
                               f"{len(checkpoint['history'])} epochs in {run_args.checkpoint_dir}/")
        scores[kind] = {**model_scores, "binarize": binarize,
                        **training_record(checkpoint, len(train_images))}
    if "vae" in checkpoints:
        with phases("computing the IWAE bound"):
            targets = utils.binarized(test_images, scores["vae"]["binarize"], "test")
            nats = metrics.iwae_nll(models["VAE"], targets, nll_samples, progress=True)
            scores["vae"]["test_nll_iwae"] = {"nats": nats, "samples": nll_samples}
    with phases("scoring samples"):
        samplers = metrics.make_samplers(models, train_images)
        reference, _ = metrics.classify(classifier, test_images)  # (N, 128) features
        scores["samples"] = metrics.score_samples(samplers, classifier, test_images, reference,
                                                  run_args.quality_samples)
    with phases("scoring interpolations"):
        pairs = metrics.interpolation_pairs(data["test"][1])
        scores["interpolation"] = {
            name: metrics.interpolation_quality(model, codes[name], data["test"][1], classifier,
                                                reference, pairs)
            for name, model in models.items()}
    utils.save_json(Path(run_args.figure_dir) / "metrics.json",
                    {**scores, "notes": metrics.METRICS_NOTES})
    histories = {MODEL_NAMES[kind]: checkpoints[kind]["history"] for kind in checkpoints}
    configs = {MODEL_NAMES[kind]: ModelConfig(**checkpoint["config"])
               for kind, checkpoint in checkpoints.items()}
    plots.draw_figures(models, configs, codes, samplers, histories, scores, data, dataset,
                       run_args.figure_dir, phases)
    return scores


def print_summary(scores, run_args):
    """The numbers of this evaluation, a line per model and sampler; then the training speed,
    labelled as the checkpoint's when --eval only read it."""
    for kind in run_args.models:
        m = scores[kind]
        iwae = m.get("test_nll_iwae")
        nll = f", IWAE bound {iwae['nats']:.2f} (k={iwae['samples']})" if iwae else ""
        codes_kl = m["latent"]["aggregate_codes"]["gaussian_kl_to_prior"]
        print(f"{MODEL_NAMES[kind]}: test loss {m['test']['loss']:.2f} nats/image{nll}, "
              f"PSNR {m['reconstruction']['psnr']:.2f} dB, codes' KL to N(0, I) {codes_kl:.2f} "
              f"nats")
    for label, sample_scores in scores["samples"].items():
        print(f"samples {label}: Frechet distance {sample_scores['frechet_distance']:.1f}, "
              f"{100 * sample_scores['confident_share']:.1f}% confident, class entropy "
              f"{sample_scores['class_entropy_bits']:.2f} bits")
    for name, paths in scores["interpolation"].items():
        print(f"interpolation {name}: midpoints' Frechet distance "
              f"{paths['midpoint_frechet_distance']['mean']:.1f}, "
              f"{100 * paths['in_between_confident_share']['mean']:.1f}% of frames confident, "
              f"evenness {paths['evenness']['mean']:.3f}, "
              f"{100 * paths['class_changes_more_than_once']['mean']:.1f}% of two-class paths "
              "change class more than once")
    for kind in run_args.models:
        m = scores[kind]
        how = f"{m['images_per_second']} images/s on {m['trained_on']}"
        how += f", {m['threads']} thread{'s' * (m['threads'] > 1)}" if m.get("threads") else ""
        how += ", bf16" if m["flags"]["precision"] == "bf16" else ""
        whose = "its checkpoint's training" if run_args.eval else "training"
        print(f"{MODEL_NAMES[kind]}: {whose}: {m['epochs']} epochs, {m['seconds_per_epoch']:.2f} "
              f"s/epoch ({how})")
    print(f"figures and metrics.json written to {run_args.figure_dir}/")


def write_study(args, results):
    """The latent-size study: the scores of each latent size, as a table, a figure and JSON."""
    study = {str(size): metrics.study_row(scores) for size, scores in results.items()}
    utils.save_json(Path(args.figure_dir) / "latent_study.json", study)
    plots.plot_latent_study(study, Path(args.figure_dir) / "latent_study.png")
    print(metrics.latent_study_table(study))
    print(f"latent_study.png and latent_study.json written to {args.figure_dir}/")
    return study


def slim_checkpoints(checkpoints, checkpoint_dir):
    """Rewrite each checkpoint with only what --eval reads: no Adam state, no discriminator."""
    for kind, checkpoint in checkpoints.items():
        path = checkpoint_files.checkpoint_path(checkpoint_dir, kind)
        checkpoint_files.save_checkpoint(path, {key: value for key, value in checkpoint.items()
                                                if key not in ("optimizer", "adversary")})
        print(f"{path} slimmed to what --eval reads ({path.stat().st_size / 2**20:.1f} MiB); "
              "--resume can no longer continue it")


def comparison_runs(args):
    """[(label, kind, checkpoint path, metrics.json path)]: the reference VAE and AE, then each
    run under CHECKPOINT_DIR/comparison/, by name."""
    runs = [(f"{MODEL_NAMES[kind]} (reference)", kind,
             checkpoint_files.checkpoint_path(args.checkpoint_dir, kind),
             Path(args.figure_dir) / "metrics.json") for kind in MODEL_NAMES]
    folder = Path(args.checkpoint_dir) / "comparison"
    for run_dir in sorted(folder.glob("*/")) if folder.is_dir() else []:
        for kind in MODEL_NAMES:
            if checkpoint_files.checkpoint_path(run_dir, kind).is_file():
                runs.append((run_dir.name if kind == "vae" else f"{run_dir.name} {kind.upper()}",
                             kind, checkpoint_files.checkpoint_path(run_dir, kind),
                             Path(args.figure_dir) / "comparison" / run_dir.name / "metrics.json"))
    return runs


def compare_runs(args, phases):
    """--compare: each run's model from its checkpoint and its scores from its metrics.json;
    the figure of samples and reconstructions and the table (printed and written as JSON)."""
    with phases("reading the data"):
        data = load_data(args.data_dir, args.dataset, torch.device("cpu"))
    models, table = {}, {}
    with phases("loading the checkpoints"):
        for label, kind, path, metrics_path in comparison_runs(args):
            checkpoint = checkpoint_files.load_checkpoint(path)
            models[label] = restore_model(checkpoint, kind, path.parent, torch.device("cpu"))[1]
            try:
                table[label] = metrics.comparison_row(utils.load_json(metrics_path), kind)
            except (KeyError, TypeError, AttributeError) as error:
                raise utils.ProjectError(f"{metrics_path} lacks the {kind.upper()}'s score "
                                         f"{error}; rewrite it with python main.py --eval "
                                         f"--checkpoint-dir {path.parent}") from None
    folder = Path(args.figure_dir) / "comparison"
    with phases("drawing the figures"):
        plots.plot_comparison(models, data["test"][0], folder / "comparison.png")
    utils.save_json(folder / "comparison.json", table)
    print(metrics.comparison_table(table))
    print(f"comparison.png and comparison.json written to {folder}/")
    return table


# ----------------------------------------------------------------------------------------- helpers

def load_data(data_dir, dataset, device):
    """{split: (images, labels)}: images (N, 784) in [0, 1] on `device`, labels (N,)."""
    splits = utils.load_dataset(data_dir, dataset)
    data = {split: (utils.to_model_input(images, device), labels)
            for split, (images, labels) in splits.items()}
    print(f"device {device}: {len(data['train'][0])} training and {len(data['test'][0])} test "
          f"images of {utils.DATASETS[dataset].title} from {data_dir}/")
    return data


def run_folders(args):
    """One run, or with --latent-study one per latent size, each in its own folders."""
    if not args.latent_study:
        return [args]
    return [argparse.Namespace(**{**vars(args), "latent_dim": size, "latent_study": None,
                                  "checkpoint_dir": f"{args.checkpoint_dir}/latent-{size}",
                                  "figure_dir": f"{args.figure_dir}/latent-{size}"})
            for size in dict.fromkeys(args.latent_study)]


def written_folders(runs, evaluating):
    """The folders the runs write into, each locked while they do: the figure folders and, when
    training, the checkpoint folders. Resolved, so that a folder named twice is locked once."""
    folders = [run_args.figure_dir for run_args in runs]
    folders += [run_args.checkpoint_dir for run_args in runs
                if not evaluating or run_args.slim]  # --slim rewrites the checkpoints
    return list(dict.fromkeys(Path(folder).resolve() for folder in folders))


def saved_checkpoints(run_args):
    """The checkpoints --eval evaluates (those of --models, or all in the folder) or --resume
    continues, each checked now, before any training."""
    folder = run_args.checkpoint_dir
    paths = {kind: checkpoint_files.checkpoint_path(folder, kind) for kind in MODEL_NAMES}
    saved = [kind for kind, path in paths.items() if path.is_file()]
    if run_args.models is None:  # --eval: what the folder holds (or both, to name one missing)
        run_args.models = saved if run_args.eval and saved else list(MODEL_NAMES)
    if not (run_args.eval or run_args.resume):
        return {}
    # --resume continues what is there; a model with no checkpoint yet starts afresh
    kinds = run_args.models if run_args.eval else [k for k in run_args.models if k in saved]
    checkpoints = {kind: checkpoint_files.load_checkpoint(paths[kind]) for kind in kinds}
    for kind, checkpoint in checkpoints.items():  # a damaged or wrong one fails now
        checkpoint_files.check_stored_flags(checkpoint, paths[kind], build_parser())
        restore_model(checkpoint, kind, folder, torch.device("cpu"))
    return checkpoints


def name_decided_flags(run_args, checkpoints):
    """The flags given on the command line that the checkpoints decide instead, named in one line
    each: with --resume a model flag that differs is an error (the weights are that model), a
    training flag a note (the run continues exactly as it began); --eval uses neither."""
    decided = {}  # (flag, the checkpoint's value, the given value) -> the files
    for kind, checkpoint in checkpoints.items():
        stored = {**checkpoint["config"], **stored_flags(checkpoint),
                  "epochs": len(checkpoint["history"])}
        flags = MODEL_FLAGS + TRAINING_FLAGS + ["dataset"] + ["epochs"] * run_args.eval
        for flag in flags:
            given = getattr(run_args, flag)
            if flag in run_args.given and flag in stored and stored[flag] != given:
                path = checkpoint_files.checkpoint_path(run_args.checkpoint_dir, kind)
                decided.setdefault((flag, stored[flag], given), []).append(str(path))
    for (flag, value, given), paths in decided.items():
        option, files = f"--{flag.replace('_', '-')}", " and ".join(paths)
        if run_args.resume and flag in MODEL_FLAGS:
            raise utils.ProjectError(f"{option} {given} contradicts {files} ({flag} {value}): "
                                     "--resume continues that model; drop the flag, or train a "
                                     "new model into another --checkpoint-dir", exit_code=2)
        mode = "--resume continues" if run_args.resume else "--eval evaluates"
        print(f"note: {option} {given} is not used: {mode} {files} as trained ({flag} {value})")


def dataset_of(args, checkpoints):
    """--dataset, unless the checkpoints were trained on another: --eval and --resume follow."""
    stored = {stored_flags(checkpoint)["dataset"] for saved in checkpoints for checkpoint in
              saved.values()}
    if len(stored) > 1:
        raise utils.ProjectError(f"the checkpoints under {args.checkpoint_dir}/ were trained on "
                                 f"{' and '.join(sorted(stored))}: evaluate one folder at a time")
    return stored.pop() if stored else args.dataset


def stored_flags(checkpoint):
    """The flags a checkpoint was trained with; one added since it was written has its default."""
    return {**vars(parse_args([])), **checkpoint["args"]}


def restore_model(checkpoint, kind, checkpoint_dir, device):
    """Rebuild the model of `kind` that `checkpoint` (from `checkpoint_dir`) holds, from its
    own config, each part checked as data first; return (config, model)."""
    path = checkpoint_files.checkpoint_path(checkpoint_dir, kind)
    config = checkpoint_files.dataclass_from(
        ModelConfig, checkpoint["config"], path,
        choices={"kind": list(MODEL_NAMES), "arch": ARCHITECTURES})
    if config.kind != kind:
        raise utils.ProjectError(f"{path} holds the {config.kind.upper()} model, not the "
                                 f"{kind.upper()}; restore the right file or retrain with "
                                 f"--models {kind}")
    model = build_model(config)
    problem = checkpoint_files.state_dict_problem(checkpoint["model"], model.state_dict())
    if problem is None and any("codes" in record and record["codes"].shape[1] != config.latent_dim
                               for record in checkpoint["history"]):
        problem = f"its history holds codes that are not {config.latent_dim}-D"
    if problem:
        raise utils.ProjectError(f"{path}: {problem}; the file is damaged or from another "
                                 "version: retrain, or restore it")
    model.load_state_dict(checkpoint["model"])
    return config, model.to(device)


def training_record(checkpoint, num_train_images):
    history, flags = checkpoint["history"], stored_flags(checkpoint)
    train_seconds = sum(record["train_seconds"] for record in history)
    return {
        "epochs": len(history),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / len(history), 3),
        "images_per_second": round(num_train_images * len(history) / train_seconds),
        "wall_seconds": round(sum(record["epoch_seconds"] for record in history), 2),
        "trained_on": checkpoint.get("device", "an unknown device"),
        "threads": checkpoint.get("threads"),
        "config": checkpoint["config"],
        "flags": {key: flags[key] for key in ("batch_size", "lr", "seed", "binarize", "kl_warmup",
                                              "lr_schedule", "precision", *OBJECTIVE_FLAGS)},
    }


def nll_samples_for(run_args):
    """--nll-samples; else with --eval the count of the metrics.json it replaces, so that --eval
    reproduces that file; else the default."""
    if run_args.nll_samples:
        return run_args.nll_samples
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if run_args.eval:
            stored = json.loads((Path(run_args.figure_dir) / "metrics.json").read_text())
            samples = stored["vae"]["test_nll_iwae"]["samples"]
            if isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1:
                return samples
    return DEFAULT_NLL_SAMPLES


def make_optimizer(model, lr, device, **settings):
    # fused: one kernel for all the parameters (measured: 0.4 against 1.1 ms a step on a CPU)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"),
                            **settings)


def learning_rate(base_lr, schedule, epoch, epochs):
    """The learning rate of `epoch` (1-based): constant, or cosine-annealed towards 0."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    return base_lr


def kl_warmup_range(epoch, warmup_epochs):
    """The share of the KL weight at the start and the end of `epoch` (1-based)."""
    if warmup_epochs <= 0:
        return 1.0, 1.0
    return min(1.0, (epoch - 1) / warmup_epochs), min(1.0, epoch / warmup_epochs)


class NonFiniteLoss(Exception):
    def __init__(self, step):
        super().__init__(step)
        self.step = step


# ------------------------------------------------------------------------- signals and errors

def stop_message(signal_name, phase, args):
    """The line a signal ends the run with: the phase, what the checkpoints on disk hold, and
    how to go on."""
    if args.eval:
        return (f"stopped by {signal_name} while {phase}; the checkpoints are untouched; run the "
                "same command again")
    paths = [checkpoint_files.checkpoint_path(run_args.checkpoint_dir, kind)
             for run_args in run_folders(args) for kind in args.models or MODEL_NAMES]
    return (f"stopped by {signal_name} while {phase}; {checkpoint_files.saved_epochs(paths)}; "
            f"continue with: python main.py {' '.join(args.argv)} --resume")


@contextlib.contextmanager
def one_line_errors(args, phases):
    """A signal or a failed allocation, in any phase, becomes one line that names the phase."""
    try:
        yield
    except utils.Stopped as stopped:
        message = stop_message(stopped.signal_name, phases.current, args)
        raise utils.ProjectError(message, exit_code=130) from None
    except (MemoryError, RuntimeError) as error:
        if not utils.is_out_of_memory(error):
            raise
        flags = MEMORY_FLAGS.get(phases.current, ["hidden_dim", "batch_size"])
        named = " or ".join(f"--{flag.replace('_', '-')} (now {getattr(args, flag)})"
                            for flag in flags)
        raise utils.ProjectError(f"out of memory while {phases.current}; lower {named}") from None


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # each line when printed, into a pipe or tee too
    try:
        main()
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at Python's exit
    except BrokenPipeError:  # a reader closed stdout or stderr (`python main.py | head -1`)
        utils.silence_closed_streams()
        sys.exit(141)  # 128 + SIGPIPE: what a shell reports for a process whose pipe closed
    gc.freeze()  # Python's exit then skips a garbage collection over torch's objects (0.5 s)
