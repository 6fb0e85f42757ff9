"""What main.py's training loop calls, each behind a name: the learning-rate schedule and the KL
warm-up, batches in a seeded order, bfloat16 autocast, the epoch's running losses and their
progress bar, the sharpness terms wrapped around a model and the discriminator's own step, and the
optimizer and random states a checkpoint restores. The loop itself (batch, forward, zero_grad,
backward, step) is main.train_epoch; the models and losses are models.py's. Writes no file."""
import math

import torch
from tqdm import tqdm

import checkpoint_files
import utils
from models import Discriminator, TrainingObjective


def learning_rate(base_lr, schedule, epoch, epochs):
    """The learning rate of `epoch` (1-based): constant, or cosine-annealed towards 0."""
    if schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    return base_lr


def kl_weight_range(epoch, warmup_epochs):
    """The share of the KL weight at the start and the end of `epoch` (1-based)."""
    if warmup_epochs <= 0:
        return 1.0, 1.0
    return min(1.0, (epoch - 1) / warmup_epochs), min(1.0, epoch / warmup_epochs)


def kl_weight_per_step(kl_range, steps):
    """The KL weight of each step of an epoch: from kl_range[0] to kl_range[1], linearly."""
    start, end = kl_range
    return [start + (end - start) * step / steps for step in range(1, steps + 1)]


def model_generators(seed, device):
    """A model's own generators on `device`: (order, draws), for its batch order and for its z
    and binarized pixels, seeded from --seed."""
    return tuple(torch.Generator(device).manual_seed(seed + k) for k in (0, 1))


def shuffled_batches(targets, labels, batch_size, order_generator):
    """(targets, labels) in an order drawn from `order_generator`, `batch_size` rows at a time."""
    order = torch.randperm(len(targets), generator=order_generator, device=targets.device)
    return ((targets[order[start:start + batch_size]], labels[order[start:start + batch_size]])
            for start in range(0, len(targets), batch_size))


def autocast(precision, device):
    """bf16: the forward pass under bfloat16 autocast; fp32: nothing. A new one each step: it
    keeps its bfloat16 weights until it exits, so one around the epoch would train every step on
    the first step's weights (tried: the loss diverges)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def divergence_advice(flags):
    """What to lower when a loss diverged: an extra term's weight where one is on (its adaptive
    weight can grow a hundredfold), else the learning rate."""
    terms = [f"--{flag.replace('_', '-')} (now {flags[flag]:g})"
             for flag in ("adversarial_weight", "perceptual_weight") if flags[flag] > 0]
    return f"try a lower {' or '.join([*terms, '--lr'])}"


class NonFiniteLoss(Exception):
    def __init__(self, step):
        super().__init__(step)
        self.step = step


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


# ------------------------------------------------------------ the sharpness terms' training

def training_objective(model, flags, device, perceptual=None):
    """What the loop trains: the bare model, or with --perceptual-weight or --adversarial-weight
    (`flags`) a TrainingObjective around it, and the discriminator's own step (else None).
    perceptual: the perceptual term's frozen CNN, on `device`."""
    if not (flags["perceptual_weight"] > 0 or flags["adversarial_weight"] > 0):
        return model, None
    discriminator_step = None
    if flags["adversarial_weight"] > 0:
        torch.manual_seed(flags["seed"] + 2)  # the discriminator's weights, after the model's
        discriminator_step = DiscriminatorStep(Discriminator().to(device), flags["lr"], device)
    objective = TrainingObjective(
        model=model, perceptual_weight=flags["perceptual_weight"], perceptual=perceptual,
        adversarial_weight=flags["adversarial_weight"],
        discriminator=discriminator_step.discriminator if discriminator_step else None)
    return objective, discriminator_step


class DiscriminatorStep:
    """The discriminator's own training: Adam (betas 0.5, 0.9, as in taming-transformers) on the
    hinge loss between a batch of images and the model's decodes of it, detached."""

    def __init__(self, discriminator, lr, device):
        self.discriminator = discriminator
        self.optimizer = utils.make_optimizer(discriminator, lr, device, betas=(0.5, 0.9))
        self.total, self.steps = 0.0, 0

    def step(self, real, fake):
        loss = self.discriminator.discriminator_loss(real, fake)
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
        return {"model": self.discriminator.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def restore(self, checkpoint, path):
        """The discriminator's weights and Adam as `checkpoint` (from `path`) saved them."""
        state = next((checkpoint[key] for key in checkpoint_files.DISCRIMINATOR_KEYS
                      if key in checkpoint), None)
        if not isinstance(state, dict) or "model" not in state:
            raise utils.ProjectError(f"{path}: its discriminator is missing, though it trained "
                                     "with --adversarial-weight; retrain")
        problem = checkpoint_files.state_dict_problem(state["model"],
                                                      self.discriminator.state_dict())
        if problem:
            raise utils.ProjectError(f"{path}: its discriminator: {problem}; retrain")
        self.discriminator.load_state_dict(state["model"])
        try:  # as restore_training_state treats the model's own Adam
            checkpoint_files.restore_adam(self.optimizer, state.get("optimizer"))
        except RESTORE_ERRORS as error:
            raise utils.ProjectError(f"{path}: its discriminator's optimizer cannot be restored "
                                     f"({utils.first_line(error, 80)}); retrain") from None


# ---------------------------------------------------------------------------- resuming

RESTORE_ERRORS = (AttributeError, KeyError, TypeError, ValueError, RuntimeError)  # a damaged state
EARLIER_NAMES = {"order": "shuffle", "draws": "noise"}  # the generators' names in older checkpoints


def restore_training_state(checkpoint, path, optimizer, generators, device):
    """Adam's moments and the generators' states ({name: generator}, as the checkpoint's "rng"
    names them), as the checkpoint at `path` saved them; one line where the file holds something
    else. Generator states are per kind of device: on another kind they start from the seed, and
    a note says that the run then goes on, but not bit for bit as it would have."""
    try:
        checkpoint_files.restore_adam(optimizer, checkpoint.get("optimizer"))
        rng, trained_on = checkpoint.get("rng"), torch.device(checkpoint.get("device", "cpu"))
        if trained_on.type == device.type:
            for name, generator in generators.items():
                generator.set_state(rng[name] if name in rng else rng[EARLIER_NAMES[name]])
        else:
            print(f"note: {path} trained on {trained_on.type}; on {device.type} its batch order "
                  "and its draws start again from its seed, so the run goes on, but not bit for "
                  f"bit as it would have on {trained_on.type}")
    except RESTORE_ERRORS as error:
        raise utils.ProjectError(f"{path}: its optimizer or random state cannot be restored "
                                 f"({utils.first_line(error, 80)}); --eval still evaluates it, "
                                 "or retrain") from None
