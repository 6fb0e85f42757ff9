"""How close is training to the hardware? Times, for the default VAE and AE, in one process:

  (a) this project's training epoch: the data resident on the device, shuffled by index,
  (b) the tutorial it replaces, pytorch/examples' VAE: torchvision MNIST + DataLoader + ToTensor,
      its model and loss, same layer sizes, batch and Adam (the AE: the same without sampling, KL),
  (c) the compute floor: the same layers' forward and backward matmuls on preallocated tensors,

and prints the ratios (b)/(a) and (a)/(c). With --precision bf16, (a) trains as `main.py
--precision bf16` does and (c) times bfloat16 matmuls; (b) stays the tutorial as published, fp32.
It also times (a) for both models side by side, as main.py trains them (on a CPU a thread each
with half the cores, on a GPU a CUDA stream each), against the sums of their (b) and (c). Peak
memory: on CUDA, allocated tensors; on the CPU, the process's resident set (Python, torch and the
data included), and in "epoch adds" what an epoch took beyond what was resident when it began.
The methods are interleaved and each reported as the median of --repeats epochs, since shared
machines drift. All run in one process, with main.py's device set-up (utils.pick_device, which
flushes denormal numbers to zero, and utils.use_device): (b) here is the tutorial's code under
that mode, not the tutorial's process; time that with its own script. Without torchvision (b)
is left out.

    python benchmark.py
    python benchmark.py --precision bf16
    python benchmark.py --arch resnet --hidden-dim 128 --models vae   # (a) only: no tutorial twin
    python benchmark.py --models vae --perceptual-weight 1 --adversarial-weight 0.5   # (a) only
    python benchmark.py --k 1 5 50 --hidden-layers 2 --latent-dim 50   # the IWAE bound's cost
"""
import argparse
import gzip
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import main
import training
import utils
from models import ARCHITECTURES, ModelConfig, PerceptualNet, build_model

PROJECT, TUTORIAL, FLOOR = ("(a) this project", "(b) tutorial DataLoader + ToTensor",
                            "(c) compute floor (matmuls only)")
SIDE_BY_SIDE = "(a) side by side, as main.py trains"
TUTORIAL_SHAPE = {"arch": "mlp", "hidden_dim": 400, "hidden_layers": 1, "latent_dim": 20,
                  "perceptual_weight": 0.0, "adversarial_weight": 0.0}  # the tutorial's model


def iwae_method(k):
    return f"(a) --objective iwae --k {k}" + (" (the ELBO)" if k == 1 else "")


def project_epoch(kind, train, batch_size, device, precision, bar_position=None, *,
                  perceptual_weight=0.0, adversarial_weight=0.0, **shape):
    """(a): main.train_epoch of a new model; shape: ModelConfig's fields (arch, hidden_dim,
    hidden_layers, latent_dim, objective, k)."""
    model = build_model(ModelConfig(kind=kind, **shape)).to(device)
    optimizer = utils.make_optimizer(model, 1e-3, device)
    objective, discriminator_step = with_extra_terms(model, perceptual_weight, adversarial_weight,
                                                     device)
    order, draws = training.model_generators(0, device)
    return lambda: main.train_epoch(objective, optimizer, *train, batch_size=batch_size,
                                    order=order, draws=draws, precision=precision,
                                    description=f"(a) {kind}", bar_position=bar_position,
                                    discriminator_step=discriminator_step)


def with_extra_terms(model, perceptual_weight, adversarial_weight, device):
    """(objective, discriminator step) as main.train_models builds them, the adversarial term on
    from the first step; the perceptual CNN untrained, since its weights do not change the time."""
    flags = {"perceptual_weight": perceptual_weight, "adversarial_weight": adversarial_weight,
             "seed": 0, "lr": 1e-3}
    perceptual = PerceptualNet().to(device) if perceptual_weight > 0 else None
    objective, discriminator_step = training.training_objective(model, flags, device, perceptual)
    if discriminator_step:
        objective.adversarial_on = True
    return objective, discriminator_step


def side_by_side_epoch(kinds, train, batch_size, device, precision, **shape):
    """(a) for all `kinds` at once, each model in a thread, as main.train_models trains them."""
    epochs = {kind: project_epoch(kind, train, batch_size, device, precision, position,
                                  **shape)
              for position, kind in enumerate(kinds)}
    return lambda: utils.side_by_side(epochs, device=device)


def stage_for_torchvision(data_dir, folder):
    """torchvision's MNIST reads uncompressed files from root/MNIST/raw: write them there."""
    raw = Path(folder) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for names in utils.MNIST_FILES.values():
        for name in names:
            data = utils.find_idx_file(data_dir, name).read_bytes()
            (raw / name).write_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return folder


class TutorialModel(nn.Module):
    """pytorch/examples vae/main.py's VAE (fc1, fc21, fc22, fc3, fc4, a sigmoid output);
    variational=False drops the sampling and the KL term: the AE with the same layers."""

    def __init__(self, variational):
        super().__init__()
        self.variational = variational
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
        self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, x):
        h1 = F.relu(self.fc1(x.view(-1, 784)))
        mu = self.fc21(h1)
        logvar = self.fc22(h1) if self.variational else torch.zeros_like(mu)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.variational else mu
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def tutorial_loss(recon_x, x, mu, logvar, variational):
    bce = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) if variational else bce


def tutorial_epoch(kind, root, batch_size, device):
    """pytorch/examples vae/main.py's training epoch: its data pipeline, model, loss and step."""
    from torchvision import datasets, transforms

    loader_options = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
    loader = torch.utils.data.DataLoader(
        datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor()),
        batch_size=batch_size, shuffle=True, **loader_options)
    variational = kind == "vae"
    model = TutorialModel(variational).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch():
        model.train()
        train_loss = 0.0
        for data, _ in loader:
            data = data.to(device)
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(data)
            loss = tutorial_loss(recon_batch, data, mu, logvar, variational)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
        return train_loss
    return epoch


def floor_epoch(kind, steps, batch_size, device, precision):
    """Only the matmuls of a training step, `steps` times: x W^T forward; dW and dx backward."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    layers = [m for m in build_model(ModelConfig(kind=kind)).modules() if isinstance(m, nn.Linear)]

    def tensor(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)
    weights = [tensor(layer.out_features, layer.in_features) for layer in layers]
    inputs = [tensor(batch_size, layer.in_features) for layer in layers]
    outputs = [tensor(batch_size, layer.out_features) for layer in layers]
    grad_outputs = [tensor(batch_size, layer.out_features) for layer in layers]
    grad_weights = [torch.empty_like(w) for w in weights]
    grad_inputs = [torch.empty_like(x) for x in inputs]

    def epoch():
        for _ in range(steps):
            for k in range(len(layers)):
                torch.mm(inputs[k], weights[k].t(), out=outputs[k])
            for k in reversed(range(len(layers))):
                torch.mm(grad_outputs[k].t(), inputs[k], out=grad_weights[k])
                if k > 0:  # the images need no gradient
                    torch.mm(grad_outputs[k], weights[k], out=grad_inputs[k])
    return epoch


def memory_mb(device, which):
    """MiB in use "now" or at the "peak" since the last reset: on CUDA the tensors allocated; on
    the CPU (Linux) the process's resident set (VmRSS, VmHWM); elsewhere (a Mac) the peak
    resident set so far for both."""
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device) if which == "now" else \
            torch.cuda.max_memory_allocated(device)
        return allocated / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        field = "VmRSS" if which == "now" else "VmHWM"
        return int(re.search(field + r":\s+(\d+) kB", status).group(1)) / 2**10
    except (OSError, AttributeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes; BSD: KiB
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak_memory(device):
    """Start a new peak; return the memory in use now."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    return memory_mb(device, "now")


def timed(run, device):
    utils.wait_for_queued_work(device)
    start = time.perf_counter()
    run()
    utils.wait_for_queued_work(device)
    return time.perf_counter() - start


def methods_to_time(args, train, root, device):
    """{(models, method): one epoch}, for each model and, on a CPU or a GPU, for both side by
    side."""
    steps = -(-len(train[0]) // args.batch_size)
    methods, shape = {}, {"arch": args.arch, "hidden_dim": args.hidden_dim,
                          "hidden_layers": args.hidden_layers, "latent_dim": args.latent_dim,
                          "perceptual_weight": args.perceptual_weight,
                          "adversarial_weight": args.adversarial_weight}
    if args.k:  # the VAE on the IWAE bound at each K (K = 1: the ELBO), nothing else
        return {("vae", iwae_method(k)): project_epoch("vae", train, args.batch_size, device,
                                                       args.precision, objective="iwae", k=k,
                                                       **shape) for k in args.k}
    for kind in args.models:
        methods[kind, PROJECT] = project_epoch(kind, train, args.batch_size, device,
                                               args.precision, **shape)
        if shape != TUTORIAL_SHAPE:
            continue  # the tutorial and the floor are the default MLP's: (a) alone
        if has_torchvision():
            methods[kind, TUTORIAL] = tutorial_epoch(kind, root, args.batch_size, device)
        methods[kind, FLOOR] = floor_epoch(kind, steps, args.batch_size, device, args.precision)
    if device.type in ("cpu", "cuda") and len(args.models) > 1:
        methods["+".join(args.models), SIDE_BY_SIDE] = side_by_side_epoch(
            args.models, train, args.batch_size, device, args.precision, **shape)
    return methods


def has_torchvision():
    """Whether the tutorial's torchvision is installed; where it is not, (b) is left out."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print("torchvision is not installed: (b), the tutorial's DataLoader epoch, is left out")
        return False
    return True


def time_methods(methods, repeats, device):
    """Median seconds of each method over `repeats` interleaved epochs, after one untimed epoch
    each that measures its memory: ({key: seconds}, {key: (peak MiB, MiB the epoch added)})."""
    memory = {}
    for key, epoch in methods.items():
        in_use = reset_peak_memory(device)
        epoch()
        peak = memory_mb(device, "peak")
        memory[key] = peak, peak - in_use
    seconds = {key: [] for key in methods}
    for _ in range(repeats):
        for key, epoch in methods.items():
            seconds[key].append(timed(epoch, device))
    return {key: statistics.median(values) for key, values in seconds.items()}, memory


def print_table(median, memory, kinds, images, steps):
    print(f"{'models':7} {'method':38} {'s/epoch':>8} {'images/s':>9} {'ms/step':>8} "
          f"{'peak MiB':>9} {'epoch adds':>10}")
    for (models, name), value in median.items():
        seen = images * len(models.split("+"))
        print(f"{models.upper():7} {name:38} {value:8.2f} {seen / value:9.0f} "
              f"{1e3 * value / steps:8.2f} {memory[models, name][0]:9.0f} "
              f"{memory[models, name][1]:10.0f}")
    for kind in (kind for kind in kinds if (kind, TUTORIAL) in median):
        a, b, c = (median[kind, name] for name in (PROJECT, TUTORIAL, FLOOR))
        print(f"{kind.upper():7} (b)/(a) = {b / a:.2f}x faster than the tutorial; "
              f"(a)/(c) = {a / c:.2f}x the floor")
    both = "+".join(kinds)
    if (both, SIDE_BY_SIDE) in median:
        a, alone = median[both, SIDE_BY_SIDE], sum(median[kind, PROJECT] for kind in kinds)
        sums = ""
        if all((kind, TUTORIAL) in median for kind in kinds):
            b, c = (sum(median[kind, name] for kind in kinds) for name in (TUTORIAL, FLOOR))
            sums = (f"; against the sums of (b) and (c): (b)/(a) = {b / a:.2f}x, (a)/(c) = "
                    f"{a / c:.2f}x")
        print(f"{both.upper():7} side by side: {alone / a:.2f}x faster than one after the "
              f"other{sums}")


def main_benchmark(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="the MNIST folder, as for main.py")
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    parser.add_argument("--batch-size", type=main.number(int, 1), default=128)
    parser.add_argument("--repeats", type=main.number(int, 1), default=5,
                        help="epochs timed per method")
    parser.add_argument("--models", nargs="+", choices=["vae", "ae"], default=["vae", "ae"])
    parser.add_argument("--arch", choices=ARCHITECTURES, default="mlp",
                        help="the models' architecture, as main.py --arch; not mlp: (a) only")
    parser.add_argument("--hidden-dim", type=main.number(int, 1), default=400,
                        help="as main.py --hidden-dim")
    parser.add_argument("--hidden-layers", type=main.number(int, 1), default=1,
                        help="as main.py --hidden-layers")
    parser.add_argument("--latent-dim", type=main.number(int, 1), default=20,
                        help="as main.py --latent-dim")
    parser.add_argument("--k", nargs="+", type=main.number(int, 1), metavar="K",
                        help="time (a) alone, for the VAE trained with --objective iwae at each K "
                             "(1: the ELBO), and print each K's cost against the first's")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="of (a) and (c), as main.py --precision")
    parser.add_argument("--perceptual-weight", type=main.number(float, 0), default=0.0,
                        help="as main.py --perceptual-weight; above 0: (a) only")
    parser.add_argument("--adversarial-weight", type=main.number(float, 0), default=0.0,
                        help="as main.py --adversarial-weight, on from the first step; above 0: "
                             "(a) only")
    args = parser.parse_args(argv)
    try:
        device = utils.pick_device(args.device)
        utils.use_device(device)
        if args.precision == "bf16":
            utils.check_bf16(device)
        images, labels = utils.load_dataset(args.data_dir)["train"]
        train = utils.to_model_input(images, device), labels.to(device)
    except utils.ProjectError as error:
        raise SystemExit(f"error: {error}")
    steps = -(-len(images) // args.batch_size)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device {device}{threads}, torch {torch.__version__}, --arch {args.arch} --hidden-dim "
          f"{args.hidden_dim} --perceptual-weight {args.perceptual_weight:g} --adversarial-weight "
          f"{args.adversarial_weight:g} --hidden-layers {args.hidden_layers} --latent-dim "
          f"{args.latent_dim}, {args.precision} (a) and (c), "
          f"batch {args.batch_size}, {steps} steps per epoch, median of {args.repeats} epochs each")
    with tempfile.TemporaryDirectory() as folder:
        methods = methods_to_time(args, train, stage_for_torchvision(args.data_dir, folder),
                                  device)
        median, memory = time_methods(methods, args.repeats, device)
    print_table(median, memory, args.models, len(images), steps)
    for k in (args.k or [])[1:]:
        ratio = median["vae", iwae_method(k)] / median["vae", iwae_method(args.k[0])]
        print(f"VAE     --k {k}: {ratio:.2f}x the epoch of --k {args.k[0]}")


if __name__ == "__main__":
    main_benchmark()
