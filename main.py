"""Train a VAE and a plain AE on MNIST side by side, then write figures and metrics.

    python main.py                      # train both models (30 epochs), save checkpoints, write figures
    python main.py --eval               # rebuild every figure and metric from the saved checkpoints
    python main.py --data-dir ../shared/data/mnist   # read the four IDX files from a folder, offline
"""
import argparse
import math
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

import utils
from models import ModelConfig, build_model

DISPLAY_NAMES = {"vae": "VAE", "ae": "AE"}
WEIGHT_DRAWS = threading.Lock()  # the global generator draws initial weights: one model at a time


def positive(kind, *, allow_zero=False):
    """argparse type: a number of `kind` that is > 0 (>= 0 with allow_zero)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'zero or more' if allow_zero else 'positive'}, got {text}")
        return value
    return parse


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see python main.py --help)\n")


def parse_args(argv):
    parser = OneLineErrorParser(
        description="Train a VAE and a plain AE on MNIST and compare them with figures and metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=positive(int), default=30, help="passes over the 60,000 training images")
    parser.add_argument("--batch-size", type=positive(int), default=128, help="images per optimizer step")
    parser.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate")
    parser.add_argument("--latent-dim", type=positive(int), default=20, help="size of the latent code z")
    parser.add_argument("--hidden-dim", type=positive(int), default=400, help="width of the MLP hidden layer")
    parser.add_argument("--hidden-layers", type=positive(int), default=1,
                        help="MLP hidden layers in the encoder and in the decoder (--arch mlp)")
    parser.add_argument("--arch", choices=["mlp", "conv"], default="mlp",
                        help="encoder/decoder: an MLP, or two stride-2 convolutions and their transposes")
    parser.add_argument("--binarize", choices=["none", "dynamic", "static"], default="none",
                        help="none: grey pixels as Bernoulli targets (the classic tutorials); dynamic: resample "
                             "every training pixel as a Bernoulli each time it is seen (the likelihood literature); "
                             "static: binarize once. The test set is binarized once, with a fixed seed.")
    parser.add_argument("--beta", type=positive(float), default=1.0, help="KL weight in the VAE's training loss")
    parser.add_argument("--kl-warmup", type=positive(float, allow_zero=True), default=0.0, metavar="EPOCHS",
                        help="raise the KL weight linearly from 0 to --beta over this many epochs")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                        help="cosine: anneal the learning rate to 0 over --epochs")
    parser.add_argument("--nll-samples", type=positive(int), default=100,
                        help="importance samples per test image for the VAE's IWAE estimate of -log p(x) "
                             "(5000 as in Burda et al. 2015 for the README table)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: each training step's forward pass under bfloat16 autocast (weights, Adam, the "
                             "loss and all evaluation stay fp32); 1.4-1.9x faster training on a CPU with AVX512-BF16 "
                             "(README, Speed), likely slower on CPUs without; test losses as fp32's to within 0.01")
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, batch order and sampling")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or mps; auto picks CUDA, then Apple MPS, then CPU")
    parser.add_argument("--data-dir", default="data",
                        help="folder with the four MNIST IDX files (.gz or not, flat or MNIST/raw); "
                             "downloaded there by torchvision when none is found")
    parser.add_argument("--quality-samples", type=positive(int), default=10_000,
                        help="samples decoded from each sampler for the Frechet distance, confidence and class "
                             "entropy scores")
    parser.add_argument("--dataset", choices=list(utils.DATASETS), default="mnist",
                        help="MNIST digits or Fashion-MNIST clothes (same format; --eval and --resume use the "
                             "checkpoints' own)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where vae.pt and ae.pt are written")
    parser.add_argument("--figure-dir", default="figures", help="where the PNG figures and metrics.json go")
    parser.add_argument("--models", nargs="+", choices=list(DISPLAY_NAMES),
                        help="which models to train (default: both) or evaluate (default: those with a checkpoint)")
    parser.add_argument("--latent-study", nargs="+", type=positive(int), metavar="SIZE",
                        help="train (or with --eval, evaluate) one run per latent size, each in its own "
                             "CHECKPOINT_DIR/latent-SIZE and FIGURE_DIR/latent-SIZE, then write "
                             "latent_study.png and latent_study.json comparing them in FIGURE_DIR")
    parser.add_argument("--eval", action="store_true",
                        help="no training: rebuild models from the checkpoints, write figures and metrics")
    parser.add_argument("--resume", action="store_true",
                        help="continue training from the checkpoints (weights, optimizer, RNG states, history) "
                             "up to --epochs in total; lr, batch size, seed and precision come from the checkpoint")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.eval and args.resume:
        parser.error("--eval and --resume exclude each other: --eval trains nothing")
    args.argv = [word for word in argv if word != "--resume"]  # to print the command that resumes this run
    if args.models is not None:
        args.models = list(dict.fromkeys(args.models))  # drop repeats, keep order; None: decided per run folder
    return args


def train_epoch(model, optimizer, images, *, batch_size, shuffle, description, binarize="none",
                kl_warmup=(1.0, 1.0), stop=None, noise=None, bar_position=None, precision="fp32"):
    """One pass over `images` (N, 784) in a random order; returns the mean loss parts per image and their
    sum as "loss" (for the VAE the negative ELBO, whatever KL weight it trains with).

    binarize "dynamic" samples each pixel of each batch as a Bernoulli of its grey value. kl_warmup: the
    fraction of the full KL weight at the start and at the end of this epoch, raised linearly per step.
    noise: the model's own generator for those pixels and the VAE's z (None: torch's global one).
    precision "bf16" runs the forward pass under bfloat16 autocast (the backward follows it).
    Raises NonFiniteLoss if the loss is NaN or infinite; returns None, leaving the model mid-epoch,
    as soon as `stop` (a StopRequest) has been signalled.
    """
    model.train()
    order = torch.randperm(len(images), generator=shuffle, device=images.device)
    totals, seen = {}, 0
    steps = math.ceil(len(images) / batch_size)
    progress = tqdm(range(0, len(images), batch_size), desc=description, leave=False, mininterval=0.5,
                    position=bar_position)
    for step, start in enumerate(progress, start=1):
        batch = images[order[start:start + batch_size]]  # (B, 784)
        if binarize == "dynamic":
            batch = torch.bernoulli(batch, generator=noise)
        warmup = kl_warmup[0] + (kl_warmup[1] - kl_warmup[0]) * step / steps
        # a new autocast per step: it keeps its bfloat16 copies of the weights until it exits, so one around the
        # whole epoch would train every step on the weights of the first (tried: the loss diverges)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, parts = model(batch, kl_warmup=warmup, noise=noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in parts.items():
            totals[name] = totals.get(name, 0.0) + value * len(batch)
        seen += len(batch)
        if step % 50 == 0 or seen == len(images):  # reading the loss waits for the device, so not every step
            running_loss = sum(totals.values()).item() / seen
            if not math.isfinite(running_loss):
                raise NonFiniteLoss(step)
            progress.set_postfix(loss=f"{running_loss:.2f}")
        if stop is not None and stop.signal_name:
            progress.close()
            return None
    means = {name: (total / seen).item() for name, total in totals.items()}
    return {"loss": sum(means.values()), **means}


def kl_warmup_range(epoch, warmup_epochs):
    """Fraction of the KL weight at the start and the end of `epoch` (1-based) under a linear warm-up."""
    if warmup_epochs <= 0:
        return 1.0, 1.0
    return min(1.0, (epoch - 1) / warmup_epochs), min(1.0, epoch / warmup_epochs)


def learning_rate(base_lr, schedule, epoch, epochs):
    """Learning rate for `epoch` (1-based): constant, or cosine-annealed from base_lr towards 0 over `epochs`."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    return base_lr


class NonFiniteLoss(Exception):
    def __init__(self, step):
        super().__init__(step)
        self.step = step


class StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM, or a call of request(), into a request that the loop reads after
    each step."""

    def __init__(self):
        self.signal_name = None

    def __enter__(self):
        self.previous = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, number, frame):
        self.request(signal.Signals(number).name)

    def request(self, reason):
        self.signal_name = self.signal_name or reason

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def make_optimizer(model, lr, device):
    # fused: one kernel for all parameters instead of several per tensor (measured: 0.3 ms vs 0.7 ms a step on CPU)
    return torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def restore_model(checkpoint, kind, path, device):
    """Rebuild the model stored in `checkpoint` (read from `path`) from its own config."""
    config = ModelConfig(**checkpoint["config"])
    if config.kind != kind:
        raise utils.ProjectError(f"{path} holds the {config.kind.upper()} model, not the {kind.upper()}; "
                                 f"restore the right file or retrain with --models {kind}")
    model = build_model(config)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError:
        raise utils.ProjectError(f"{path}: the weights do not fit the model its config describes ({config}); "
                                 "the file is damaged or from another version: retrain") from None
    return config, model.to(device)


def noise_key(device):
    """Where a checkpoint's "rng" keeps the model's noise stream: "torch" on the CPU, as when it was the global one."""
    return "torch" if device.type == "cpu" else device.type


def new_noise(device, seed):
    """The model's own generator for z and binarized pixels, so that the VAE and the AE can train at the same time
    without one's draws shifting the other's. Called right after the weights are drawn, it continues where torch's
    global generator stands (on a GPU: starts at the seed, as the device's did), so that a model draws the numbers
    it drew when that generator was the global one, and older runs retrain bit for bit."""
    noise = torch.Generator(device=device)
    return noise.set_state(torch.get_rng_state()) if device.type == "cpu" else noise.manual_seed(seed)


def rng_states(shuffle, noise, device):
    return {"shuffle": shuffle.get_state(), noise_key(device): noise.get_state()}


EVOLUTION_IMAGES = 1000


def stored_flags(checkpoint):
    """The flags a checkpoint was trained with; a flag added since it was written gets the parser's default."""
    return {**vars(parse_args([])), **checkpoint["args"]}


def train(kind, args, train_images, test_images, device, stop, resume_from=None, bar_position=None):
    """Train one model, or continue the one in the checkpoint `resume_from`; checkpoint after every epoch;
    return the last checkpoint. Apart from the initial weights (drawn under WEIGHT_DRAWS) it draws random numbers
    only from its own generators, so another model may train at the same time."""
    path = utils.checkpoint_path(args.checkpoint_dir, kind)
    name = DISPLAY_NAMES[kind]
    shuffle = torch.Generator(device=device)
    checkpoint = resume_from
    if checkpoint is not None:
        config, model = restore_model(checkpoint, kind, path, device)
        flags = stored_flags(checkpoint)
        optimizer = make_optimizer(model, flags["lr"], device)
        optimizer.load_state_dict(checkpoint["optimizer"])
        batch_size, history = flags["batch_size"], checkpoint["history"]
        noise = torch.Generator(device=device).manual_seed(flags["seed"])
        if noise_key(device) in checkpoint["rng"]:  # absent if the checkpoint was written on another kind of device
            noise.set_state(checkpoint["rng"][noise_key(device)])
        shuffle.set_state(checkpoint["rng"]["shuffle"])
        print(f"{name}: resuming {path} after epoch {checkpoint['epoch']} (its lr, batch size and seed; "
              f"--epochs {args.epochs} is the new total)")
    else:
        shuffle.manual_seed(args.seed)
        config = ModelConfig(kind=kind, latent_dim=args.latent_dim, hidden_dim=args.hidden_dim, arch=args.arch,
                             hidden_layers=args.hidden_layers, beta=args.beta)
        # the global generator, seeded for each model (so one model's run does not depend on another's): one at a time
        with WEIGHT_DRAWS:
            torch.manual_seed(args.seed)
            model = build_model(config)
            noise = new_noise(device, args.seed)
        model = model.to(device)
        optimizer = make_optimizer(model, args.lr, device)
        batch_size, history = args.batch_size, []
        flags = vars(args)
    train_targets = utils.binarized(train_images, flags["binarize"], "train")
    test_targets = utils.binarized(test_images, flags["binarize"], "test")
    for epoch in range(len(history) + 1, args.epochs + 1):
        sync(device)
        epoch_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(flags["lr"], flags["lr_schedule"], epoch, args.epochs)
        try:
            train_parts = train_epoch(model, optimizer, train_targets, batch_size=batch_size, shuffle=shuffle,
                                      description=f"{name} epoch {epoch}/{args.epochs}",
                                      binarize=flags["binarize"],
                                      kl_warmup=kl_warmup_range(epoch, flags["kl_warmup"]), stop=stop,
                                      noise=noise, bar_position=bar_position, precision=flags["precision"])
        except NonFiniteLoss as failure:
            raise utils.ProjectError(
                f"{name} loss became NaN or infinite in epoch {epoch} by step {failure.step}; try a lower --lr "
                f"(it was {optimizer.param_groups[0]['lr']}); {path} keeps the last good epoch"
            ) from None
        if train_parts is None:
            saved = f"{path} holds epoch {epoch - 1}" if history else f"no {name} epoch was complete"
            raise utils.ProjectError(
                f"stopped by {stop.signal_name} during {name} epoch {epoch}; {saved}; continue with: "
                f"python main.py {' '.join(args.argv)} --resume", exit_code=130)
        sync(device)
        train_seconds = time.perf_counter() - epoch_start
        test_parts = utils.evaluate_loss(model, test_targets, noise=noise)
        record = {"epoch": epoch, "train": train_parts, "test": test_parts, "train_seconds": train_seconds}
        if epoch <= 30 or epoch % 10 == 0:  # codes of the first test images, for latent_evolution.gif
            record["codes"] = utils.encode_all(model, test_images[:EVOLUTION_IMAGES]).half().cpu()
        history.append({**record, "epoch_seconds": time.perf_counter() - epoch_start})
        checkpoint = {
            "config": asdict(config),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "history": history,
            "args": {**resume_from["args"], "epochs": args.epochs} if resume_from else vars(args),
            "rng": rng_states(shuffle, noise, device),  # after the test pass, whose sampling also draws from it
            "device": str(device),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,  # fewer when two train at once
        }
        utils.save_checkpoint(path, checkpoint)
        parts = "  ".join(f"{key} {value:.2f}" for key, value in test_parts.items() if key != "loss")
        tqdm.write(f"{name} epoch {epoch:3d}/{args.epochs}  train {train_parts['loss']:.2f}  "
                   f"test {test_parts['loss']:.2f} ({parts})  {history[-1]['epoch_seconds']:.1f}s")
    if checkpoint is resume_from:
        print(f"{name}: {path} already holds {len(history)} epochs; nothing to train")
    return checkpoint


def report(checkpoints, data, dataset, classifier_path, checkpoint_dir, figure_dir, device, *, nll_samples,
           quality_samples):
    """Rebuild each model from its checkpoint, write metrics.json and every figure.

    data: {"train": (images, labels), "test": (images, labels)}, images (N, 784) grey on `device`.
    """
    (train_images, train_labels), (test_images, test_labels) = data["train"], data["test"]
    info = utils.DATASETS[dataset]
    classifier, classifier_accuracy = utils.load_or_train_classifier(
        classifier_path, train_images, train_labels, test_images, test_labels)
    test_features, _ = utils.classify(classifier, test_images)
    models, samplers = {}, {}
    metrics = {"dataset": dataset, "quality_samples": quality_samples,
               "classifier": {"file": str(classifier_path), "test_accuracy": classifier_accuracy}}
    for kind, checkpoint in checkpoints.items():
        name = DISPLAY_NAMES[kind]
        _, model = restore_model(checkpoint, kind, utils.checkpoint_path(checkpoint_dir, kind), device)
        models[name] = model
        flags = stored_flags(checkpoint)
        binarize = flags["binarize"]
        # the training set is scored on one fixed binarization when training resampled it every time
        train_targets = utils.binarized(train_images, "static" if binarize == "dynamic" else binarize, "train")
        test_targets = utils.binarized(test_images, binarize, "test")
        torch.manual_seed(flags["seed"])  # the VAE's loss samples z: same seed, same numbers
        metrics[kind] = {
            "test": utils.evaluate_loss(model, test_targets),
            "train": utils.evaluate_loss(model, train_targets),
            "reconstruction": utils.reconstruction_errors(model, test_images, test_targets),
            "binarize": binarize,
            **training_record(checkpoint, len(train_images)),
        }
        test_codes = utils.encode_all(model, test_images)  # (N, D); VAE: posterior means
        aggregate_codes = test_codes
        if kind == "vae":
            aggregate_codes = utils.sample_posterior(model, test_images)  # z ~ q(z|x): the aggregate posterior
            metrics[kind]["posterior"] = utils.posterior_statistics(model, test_images)
            # last, so that the number of samples it draws changes no other number
            metrics[kind]["test_nll_iwae"] = {"nats": utils.iwae_nll(model, test_targets, nll_samples),
                                              "samples": nll_samples}
        metrics[kind]["latent"] = {"knn5_accuracy": utils.knn_accuracy(test_codes, test_labels),
                                   "aggregate_codes": utils.code_statistics(aggregate_codes)}
        samplers[f"{name}, z ~ N(0, I)"] = (model, utils.Gaussian.standard(model.latent_dim, device))
        if kind == "ae":  # the fair AE sampler: a Gaussian fitted to its own training codes
            fitted = utils.Gaussian.fitted(utils.encode_all(model, train_images))
            samplers[f"{name}, z ~ Gaussian fitted to its training codes"] = (model, fitted)
    metrics["samples"] = {
        label: utils.sample_quality(
            classifier, utils.decode_images(model, gaussian.sample(quality_samples, seed=0)).flatten(1), test_features)
        for label, (model, gaussian) in samplers.items()
    }
    metrics["notes"] = METRICS_NOTES
    figure_dir = Path(figure_dir)
    utils.save_json(figure_dir / "metrics.json", metrics)
    utils.plot_generation(samplers, figure_dir / "generation.png")
    utils.plot_interpolation(models, test_images, test_labels, info, figure_dir / "interpolation.png")
    utils.plot_latent_scatter(models, test_images, test_labels, info, figure_dir / "latent_scatter.png")
    utils.plot_reconstruction(models, test_images, info, figure_dir / "reconstruction.png")
    histories = {DISPLAY_NAMES[kind]: c["history"] for kind, c in checkpoints.items()}
    utils.plot_loss_curves(histories, figure_dir / "loss_curves.png")
    utils.write_latent_evolution(histories, test_labels[:EVOLUTION_IMAGES], info, figure_dir / "latent_evolution.gif")
    if "vae" in checkpoints:
        utils.plot_manifold(models["VAE"], metrics["vae"]["posterior"]["posterior_mean_variance"],
                            figure_dir / "manifold.png")
    return metrics


METRICS_NOTES = (
    "Losses are per image in nats: the VAE's is the negative ELBO with one sampled z per image, the AE's its BCE; "
    "targets are grey pixels as Bernoulli targets unless 'binarize' says otherwise (then the test set is one fixed "
    "Bernoulli sample). test_nll_iwae: importance-weighted estimate of -log p(x) with that many samples. "
    "reconstruction: decoded code (VAE: posterior mean) against the test image; mse per pixel, psnr in dB "
    "(peak 1) and ssim (11x11 Gaussian window) against grey pixels. samples: decoded samples scored by "
    "the project's classifier of the dataset's ten classes (frechet_distance of its 128-D features to the test "
    "set's; share classified with confidence > 0.9; entropy of the predicted-class histogram in bits, 3.32 when "
    "all ten are equally common). latent: leave-one-out 5-nearest-neighbour class accuracy on test codes (VAE: "
    "posterior means); aggregate_codes: test codes (VAE: z sampled from q(z|x)) per-dimension mean and std, and "
    "the KL from a Gaussian fitted to them to N(0, I). posterior: active units (Cov over the test set of the "
    "posterior mean > 0.01) and KL per dimension."
)


def training_record(checkpoint, num_train_images):
    history, flags = checkpoint["history"], stored_flags(checkpoint)
    train_seconds = sum(record["train_seconds"] for record in history)
    return {
        "epochs": checkpoint["epoch"],
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / len(history), 3),
        "images_per_second": round(num_train_images * len(history) / train_seconds),
        "wall_seconds": round(sum(record["epoch_seconds"] for record in history), 2),
        "trained_on": checkpoint["device"],
        "threads": checkpoint.get("threads"),  # None in checkpoints from before it was recorded
        "config": checkpoint["config"],
        "flags": {key: flags[key]
                  for key in ("batch_size", "lr", "seed", "binarize", "kl_warmup", "lr_schedule", "precision")},
    }


def run_folders(args):
    """One run, or with --latent-study one per latent size, each with its own checkpoint and figure folders."""
    if not args.latent_study:
        return [args]
    return [argparse.Namespace(**{**vars(args), "latent_dim": size, "latent_study": None,
                                  "checkpoint_dir": str(Path(args.checkpoint_dir) / f"latent-{size}"),
                                  "figure_dir": str(Path(args.figure_dir) / f"latent-{size}")})
            for size in dict.fromkeys(args.latent_study)]


def saved_checkpoints(run_args):
    """The checkpoints --eval evaluates (all of --models, or every one in the folder) or --resume continues."""
    saved = [kind for kind in DISPLAY_NAMES if utils.checkpoint_path(run_args.checkpoint_dir, kind).is_file()]
    if run_args.models is None:  # --eval: whatever the folder holds (none: name the file it lacks); training: both
        run_args.models = saved if run_args.eval and saved else list(DISPLAY_NAMES)
    if not (run_args.eval or run_args.resume):
        return {}
    # --resume continues what is there; a model with no checkpoint yet (stopped before it began) starts fresh
    kinds = run_args.models if run_args.eval else [kind for kind in run_args.models if kind in saved]
    checkpoints = {}
    for kind in kinds:
        path = utils.checkpoint_path(run_args.checkpoint_dir, kind)
        checkpoints[kind] = utils.load_checkpoint(path)
        restore_model(checkpoints[kind], kind, path, torch.device("cpu"))  # a wrong model fails now, before training
    return checkpoints


def dataset_of(args, checkpoints):
    """--dataset, unless the checkpoints were trained on another: --eval and --resume follow them."""
    stored = {stored_flags(checkpoint)["dataset"] for saved in checkpoints for checkpoint in saved.values()}
    if len(stored) > 1:
        raise utils.ProjectError(f"the checkpoints under {args.checkpoint_dir}/ were trained on different datasets "
                                 f"({', '.join(sorted(stored))}); evaluate them one folder at a time")
    return stored.pop() if stored else args.dataset


def side_by_side(jobs, stop=None):
    """Run the callables in `jobs` ({name: callable}) at the same time, each in its own thread with its share of
    torch's CPU threads; return {name: result}. If one raises, `stop` (a StopRequest) is requested so that the
    others end after their current step, and that error is raised."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // len(jobs)))
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = {name: pool.submit(job) for name, job in jobs.items()}
            done, _ = wait(futures.values(), return_when=FIRST_EXCEPTION)
            failed = [future for future in futures.values() if future in done and future.exception() is not None]
            if failed:
                if stop is not None:
                    stop.request("the other model's failure")
                raise failed[0].exception()
            return {name: future.result() for name, future in futures.items()}
    finally:
        torch.set_num_threads(threads)


def train_models(args, checkpoints, train_images, test_images, device, stop):
    """Train each model of args.models (continuing its checkpoint, if any); return {kind: last checkpoint}.

    On the CPU the models train side by side: a model's small operations and Python steps leave cores idle that
    the other one fills (benchmark.py: 1.15-1.27x faster for the VAE and AE on 2 cores than one after the other).
    Each draws from its own generators, so its weights are those it gets training alone.
    """
    def train_one(kind, position=None):
        return train(kind, args, train_images, test_images, device, stop, checkpoints.get(kind), position)
    if device.type != "cpu" or len(args.models) == 1 or torch.get_num_threads() < len(args.models):
        return {kind: train_one(kind) for kind in args.models}
    return side_by_side({kind: partial(train_one, kind, position) for position, kind in enumerate(args.models)},
                        stop)


def run(args):
    device = utils.pick_device(args.device)
    runs = run_folders(args)
    saved = [saved_checkpoints(run_args) for run_args in runs]  # a missing or bad checkpoint fails before the data
    dataset = dataset_of(args, saved)
    resumed_precisions = {stored_flags(c)["precision"] for checkpoints in saved for c in checkpoints.values()}
    if not args.eval and "bf16" in {args.precision} | resumed_precisions:
        utils.check_bf16(device)
    data = utils.load_dataset(args.data_dir, dataset)
    for run_args in runs:
        for folder in (run_args.figure_dir,) if args.eval else (run_args.checkpoint_dir, run_args.figure_dir):
            utils.check_writable(folder)
    model_data = {split: (utils.to_model_input(images, device), labels) for split, (images, labels) in data.items()}
    train_images, test_images = model_data["train"][0], model_data["test"][0]  # (60000, 784), (10000, 784) in [0, 1]
    print(f"device {device}: {len(train_images)} training and {len(test_images)} test images of "
          f"{utils.DATASETS[dataset].title} from {args.data_dir}/")
    classifier_path = Path(args.checkpoint_dir) / f"classifier-{dataset}.pt"  # shared by the runs of a study
    results = {}
    for run_args, checkpoints in zip(runs, saved):
        if not args.eval:
            with StopRequest() as stop:
                checkpoints = train_models(run_args, checkpoints, train_images, test_images, device, stop)
        metrics = report(checkpoints, model_data, dataset, classifier_path, run_args.checkpoint_dir,
                         run_args.figure_dir, device, nll_samples=args.nll_samples,
                         quality_samples=args.quality_samples)
        print_summary(metrics, run_args)
        results[run_args.latent_dim] = metrics
    if not args.latent_study:
        return metrics
    study = {str(size): study_row(metrics) for size, metrics in results.items()}
    utils.save_json(Path(args.figure_dir) / "latent_study.json", study)
    utils.plot_latent_study(study, Path(args.figure_dir) / "latent_study.png")
    print(utils.latent_study_table(study))
    print(f"latent_study.png and latent_study.json written to {args.figure_dir}/")
    return study


def study_row(metrics):
    """The numbers the latent-size study compares, for each model in one run."""
    row = {}
    for kind in DISPLAY_NAMES:
        if kind in metrics:
            row[kind] = {**metrics[kind]["reconstruction"], "test_loss": metrics[kind]["test"]["loss"]}
            if "test_nll_iwae" in metrics[kind]:
                row[kind]["test_nll_iwae"] = metrics[kind]["test_nll_iwae"]["nats"]
    return row


def print_summary(metrics, run_args):
    for kind in run_args.models:
        m = metrics[kind]
        iwae = m.get("test_nll_iwae")
        nll = f", IWAE NLL {iwae['nats']:.2f} (k={iwae['samples']})" if iwae else ""
        threads = f", {m['threads']} thread{'s' * (m['threads'] > 1)}" if m.get("threads") else ""
        threads += ", bf16" if m["flags"]["precision"] == "bf16" else ""
        print(f"{DISPLAY_NAMES[kind]}: test loss {m['test']['loss']:.2f} nats/image{nll} after {m['epochs']} epochs, "
              f"{m['seconds_per_epoch']:.2f} s/epoch ({m['images_per_second']} images/s on {m['trained_on']}{threads})")
    for label, scores in metrics["samples"].items():
        print(f"samples {label}: Frechet distance {scores['frechet_distance']:.1f}, "
              f"{100 * scores['confident_share']:.1f}% confident, "
              f"class entropy {scores['class_entropy_bits']:.2f} bits")
    print(f"figures and metrics.json written to {run_args.figure_dir}/")


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except utils.ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
