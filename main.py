"""Train a VAE and a plain AE on MNIST side by side, then write figures and metrics.

    python main.py                      # train both models (30 epochs), save checkpoints, write figures
    python main.py --eval               # rebuild every figure and metric from the saved checkpoints
    python main.py --data-dir ../shared/data/mnist   # read the four IDX files from a folder, offline
"""
import argparse
import math
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import utils
from models import ModelConfig, build_model

DISPLAY_NAMES = {"vae": "VAE", "ae": "AE"}


def positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
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
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, batch order and sampling")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or mps; auto picks CUDA, then Apple MPS, then CPU")
    parser.add_argument("--data-dir", default="data",
                        help="folder with the four MNIST IDX files (.gz or not, flat or MNIST/raw); "
                             "downloaded there by torchvision when none is found")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where vae.pt and ae.pt are written")
    parser.add_argument("--figure-dir", default="figures", help="where the PNG figures and metrics.json go")
    parser.add_argument("--models", nargs="+", choices=list(DISPLAY_NAMES), default=list(DISPLAY_NAMES),
                        help="which models to train or evaluate")
    parser.add_argument("--eval", action="store_true",
                        help="no training: rebuild models from the checkpoints, write figures and metrics")
    parser.add_argument("--resume", action="store_true",
                        help="continue training from the checkpoints (weights, optimizer, RNG states, history) "
                             "up to --epochs in total; lr, batch size and seed come from the checkpoint")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.eval and args.resume:
        parser.error("--eval and --resume exclude each other: --eval trains nothing")
    args.argv = [word for word in argv if word != "--resume"]  # to print the command that resumes this run
    args.models = list(dict.fromkeys(args.models))  # drop repeats, keep order
    return args


def train_epoch(model, optimizer, images, *, batch_size, shuffle, description, stop=None):
    """One pass over `images` (N, 784) in a random order; returns the mean loss and parts per image.

    Raises NonFiniteLoss if the loss is NaN or infinite; returns None, leaving the model mid-epoch,
    as soon as `stop` (a StopRequest) has been signalled.
    """
    model.train()
    order = torch.randperm(len(images), generator=shuffle, device=images.device)
    totals, seen = {}, 0
    progress = tqdm(range(0, len(images), batch_size), desc=description, leave=False, mininterval=0.5)
    for step, start in enumerate(progress, start=1):
        batch = images[order[start:start + batch_size]]  # (B, 784)
        loss, parts = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in {"loss": loss.detach(), **parts}.items():
            totals[name] = totals.get(name, 0.0) + value * len(batch)
        seen += len(batch)
        if step % 50 == 0 or seen == len(images):  # reading the loss waits for the device, so not every step
            running_loss = totals["loss"].item() / seen
            if not math.isfinite(running_loss):
                raise NonFiniteLoss(step)
            progress.set_postfix(loss=f"{running_loss:.2f}")
        if stop is not None and stop.signal_name:
            progress.close()
            return None
    return {name: (total / seen).item() for name, total in totals.items()}


class NonFiniteLoss(Exception):
    def __init__(self, step):
        super().__init__(step)
        self.step = step


class StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM into a request that the loop reads after each step."""

    def __init__(self):
        self.signal_name = None

    def __enter__(self):
        self.previous = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, number, frame):
        self.signal_name = signal.Signals(number).name

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


def rng_states(shuffle, device):
    states = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def train(kind, args, train_images, test_images, device, stop, resume_from=None):
    """Train one model, or continue the one in the checkpoint `resume_from`; checkpoint after every epoch;
    return the last checkpoint."""
    path = utils.checkpoint_path(args.checkpoint_dir, kind)
    name = DISPLAY_NAMES[kind]
    shuffle = torch.Generator(device=device)
    checkpoint = resume_from
    if checkpoint is not None:
        config, model = restore_model(checkpoint, kind, path, device)
        optimizer = make_optimizer(model, checkpoint["args"]["lr"], device)
        optimizer.load_state_dict(checkpoint["optimizer"])
        batch_size, history = checkpoint["args"]["batch_size"], checkpoint["history"]
        torch.set_rng_state(checkpoint["rng"]["torch"])
        shuffle.set_state(checkpoint["rng"]["shuffle"])
        if device.type == "cuda" and "cuda" in checkpoint["rng"]:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        print(f"{name}: resuming {path} after epoch {checkpoint['epoch']} (its lr, batch size and seed; "
              f"--epochs {args.epochs} is the new total)")
    else:
        torch.manual_seed(args.seed)  # each model starts from the seed, so one model's run does not depend on another's
        shuffle.manual_seed(args.seed)
        config = ModelConfig(kind=kind, latent_dim=args.latent_dim, hidden_dim=args.hidden_dim)
        model = build_model(config).to(device)
        optimizer = make_optimizer(model, args.lr, device)
        batch_size, history = args.batch_size, []
    for epoch in range(len(history) + 1, args.epochs + 1):
        sync(device)
        epoch_start = time.perf_counter()
        try:
            train_parts = train_epoch(model, optimizer, train_images, batch_size=batch_size, shuffle=shuffle,
                                      description=f"{name} epoch {epoch}/{args.epochs}", stop=stop)
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
        test_parts = utils.evaluate_loss(model, test_images)
        history.append({"epoch": epoch, "train": train_parts, "test": test_parts, "train_seconds": train_seconds,
                        "epoch_seconds": time.perf_counter() - epoch_start})
        checkpoint = {
            "config": asdict(config),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "history": history,
            "args": {**resume_from["args"], "epochs": args.epochs} if resume_from else vars(args),
            "rng": rng_states(shuffle, device),  # after the test pass, whose sampling also draws from it
            "device": str(device),
        }
        utils.save_checkpoint(path, checkpoint)
        parts = "  ".join(f"{key} {value:.2f}" for key, value in test_parts.items() if key != "loss")
        tqdm.write(f"{name} epoch {epoch:3d}/{args.epochs}  train {train_parts['loss']:.2f}  "
                   f"test {test_parts['loss']:.2f} ({parts})  {history[-1]['epoch_seconds']:.1f}s")
    if checkpoint is resume_from:
        print(f"{name}: {path} already holds {len(history)} epochs; nothing to train")
    return checkpoint


def report(checkpoints, train_images, test_images, test_labels, checkpoint_dir, figure_dir, device):
    """Rebuild each model from its checkpoint, write metrics.json and every figure."""
    models, metrics = {}, {}
    for kind, checkpoint in checkpoints.items():
        _, model = restore_model(checkpoint, kind, utils.checkpoint_path(checkpoint_dir, kind), device)
        models[DISPLAY_NAMES[kind]] = model
        history = checkpoint["history"]
        train_seconds = sum(record["train_seconds"] for record in history)
        torch.manual_seed(checkpoint["args"]["seed"])  # the VAE's loss samples z: same seed, same numbers
        metrics[kind] = {
            "test": utils.evaluate_loss(model, test_images),
            "train": utils.evaluate_loss(model, train_images),
            "epochs": checkpoint["epoch"],
            "train_seconds": round(train_seconds, 2),
            "seconds_per_epoch": round(train_seconds / len(history), 3),
            "images_per_second": round(len(train_images) * len(history) / train_seconds),
            "wall_seconds": round(sum(record["epoch_seconds"] for record in history), 2),
            "trained_on": checkpoint["device"],
            "config": checkpoint["config"],
            "flags": {key: checkpoint["args"][key] for key in ("batch_size", "lr", "seed")},
        }
    metrics["notes"] = ("Losses are per image in nats with grey pixels as Bernoulli targets; the VAE's loss is "
                        "the negative ELBO with one sampled z per image, the AE's is its BCE; train losses are "
                        "evaluated on the whole training set with the final weights.")
    figure_dir = Path(figure_dir)
    utils.save_json(figure_dir / "metrics.json", metrics)
    utils.plot_generation(models, figure_dir / "generation.png")
    utils.plot_interpolation(models, test_images, test_labels, figure_dir / "interpolation.png")
    utils.plot_latent_scatter(models, test_images, test_labels, figure_dir / "latent_scatter.png")
    utils.plot_reconstruction(models, test_images, figure_dir / "reconstruction.png")
    utils.plot_loss_curves({DISPLAY_NAMES[kind]: c["history"] for kind, c in checkpoints.items()},
                           figure_dir / "loss_curves.png")
    return metrics


def run(args):
    device = utils.pick_device(args.device)
    paths = {kind: utils.checkpoint_path(args.checkpoint_dir, kind) for kind in args.models}
    if args.eval:  # load checkpoints first: a missing one should fail before the data is read
        checkpoints = {kind: utils.load_checkpoint(path) for kind, path in paths.items()}
    else:
        # --resume continues what is there; a model with no checkpoint yet (stopped before it began) starts fresh
        resume_from = {kind: utils.load_checkpoint(path) for kind, path in paths.items() if args.resume and path.exists()}
    data = utils.load_mnist(args.data_dir)
    for folder in (args.figure_dir,) if args.eval else (args.checkpoint_dir, args.figure_dir):
        utils.check_writable(folder)
    train_images = utils.to_model_input(data["train"][0], device)  # (60000, 784) float in [0, 1]
    test_images = utils.to_model_input(data["test"][0], device)  # (10000, 784)
    test_labels = data["test"][1]
    print(f"device {device}: {len(train_images)} training and {len(test_images)} test images from {args.data_dir}/")
    if not args.eval:
        with StopRequest() as stop:
            checkpoints = {kind: train(kind, args, train_images, test_images, device, stop, resume_from.get(kind))
                           for kind in args.models}
    metrics = report(checkpoints, train_images, test_images, test_labels, args.checkpoint_dir, args.figure_dir,
                     device)
    for kind in args.models:
        m = metrics[kind]
        print(f"{DISPLAY_NAMES[kind]}: test loss {m['test']['loss']:.2f} nats/image after {m['epochs']} epochs, "
              f"{m['seconds_per_epoch']:.2f} s/epoch ({m['images_per_second']} images/s on {m['trained_on']})")
    print(f"figures and metrics.json written to {args.figure_dir}/")
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except utils.ProjectError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
