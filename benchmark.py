"""How close is training to the hardware? Times, for the default VAE and AE, in one process:

  (a) this project's training epoch: data resident on the device, shuffled by index (main.train_epoch),
  (b) the tutorial it replaces, pytorch/examples' VAE: torchvision MNIST + DataLoader + ToTensor, its model
      and loss, same layer sizes, batch and Adam (for the AE, the same without sampling and KL),
  (c) the compute floor: the same layers' forward and backward matmuls on preallocated tensors only,

and prints the ratios (b)/(a) and (a)/(c). The three are interleaved and each reported as the median
of --repeats runs, since shared machines drift.

    python benchmark.py --data-dir ../shared/data/mnist
"""
import argparse
import gzip
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import main
import utils
from models import ModelConfig, build_model


def timed(run, device):
    main.sync(device)
    start = time.perf_counter()
    run()
    main.sync(device)
    return time.perf_counter() - start


def peak_memory_mb(device):
    """Peak device memory since the last reset on CUDA; on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


def project_epoch(kind, train_images, batch_size, device):
    model = build_model(ModelConfig(kind=kind)).to(device)
    optimizer = main.make_optimizer(model, 1e-3, device)
    shuffle = torch.Generator(device=device).manual_seed(0)
    return lambda: main.train_epoch(model, optimizer, train_images, batch_size=batch_size, shuffle=shuffle,
                                    description=f"(a) {kind}")


def stage_for_torchvision(data_dir, folder):
    """torchvision's MNIST reads uncompressed files from root/MNIST/raw: write them there."""
    raw = Path(folder) / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for images_name, labels_name in utils.MNIST_FILES.values():
        for name in (images_name, labels_name):
            data = utils.find_idx_file(data_dir, name).read_bytes()
            (raw / name).write_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return folder


class TutorialModel(nn.Module):
    """pytorch/examples vae/main.py's VAE (fc1, fc21, fc22, fc3, fc4, sigmoid output); variational=False
    drops the sampling and the KL term, giving the AE with the same layers."""

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


def floor_epoch(kind, steps, batch_size, device):
    """Only the matmuls of one training step, repeated `steps` times: x W^T forward; dW and dx backward."""
    layers = [m for m in build_model(ModelConfig(kind=kind)).modules() if isinstance(m, nn.Linear)]

    def tensor(*shape):
        return torch.randn(*shape, device=device)
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


def main_benchmark(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="MNIST folder, as for main.py")
    parser.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    parser.add_argument("--batch-size", type=main.positive(int), default=128)
    parser.add_argument("--repeats", type=main.positive(int), default=5, help="epochs timed per method")
    parser.add_argument("--models", nargs="+", choices=["vae", "ae"], default=["vae", "ae"])
    args = parser.parse_args(argv)
    device = utils.pick_device(args.device)
    try:
        train_uint8 = utils.load_dataset(args.data_dir)["train"][0]
    except utils.ProjectError as error:
        raise SystemExit(f"error: {error}")
    train_images = utils.to_model_input(train_uint8, device)
    steps = -(-len(train_images) // args.batch_size)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"device {device}{threads}, torch {torch.__version__}, batch {args.batch_size}, {steps} steps per "
          f"epoch, median of {args.repeats} epochs each")
    print(f"{'model':5} {'method':34} {'s/epoch':>8} {'images/s':>9} {'ms/step':>8} {'peak MiB':>9}")
    with tempfile.TemporaryDirectory() as folder:
        root = stage_for_torchvision(args.data_dir, folder)
        for kind in args.models:
            methods = {
                "(c) compute floor (matmuls only)": floor_epoch(kind, steps, args.batch_size, device),
                "(a) this project": project_epoch(kind, train_images, args.batch_size, device),
                "(b) tutorial DataLoader + ToTensor": tutorial_epoch(kind, root, args.batch_size, device),
            }
            seconds = {name: [] for name in methods}
            memory = {}
            for name, epoch in methods.items():  # one untimed warm-up epoch each
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                epoch()
                memory[name] = peak_memory_mb(device)
            for _ in range(args.repeats):
                for name, epoch in methods.items():
                    seconds[name].append(timed(epoch, device))
            median = {name: statistics.median(values) for name, values in seconds.items()}
            for name in sorted(methods):
                print(f"{kind.upper():5} {name:34} {median[name]:8.2f} {len(train_images) / median[name]:9.0f} "
                      f"{1e3 * median[name] / steps:8.2f} {memory[name]:9.0f}")
            a, b, c = (median[name] for name in sorted(methods))
            print(f"{kind.upper():5} (b)/(a) = {b / a:.2f}x faster than the tutorial; (a)/(c) = {a / c:.2f}x the floor")


if __name__ == "__main__":
    main_benchmark()
