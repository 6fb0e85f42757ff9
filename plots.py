"""Every picture a run writes: samples, reconstructions, interpolations, the VAE's manifold, the
latent scatter and its GIF, the loss curves, the latent-size study, the architecture diagram and the
explorer page (explorer.html, from explorer_template.html beside this file). Computes no score (the
numbers come from metrics.py) and writes every file through utils' atomic writes.

Figures take dicts keyed by display names ({"VAE": ..., "AE": ...}): one model or both alike."""
import base64
import json
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FormatStrFormatter, MaxNLocator
from PIL import Image  # Pillow: installed with matplotlib
from torch import nn

import metrics
import utils
from models import NUM_CLASSES, VAE, ResBlock, SelfAttention, build_model, label_vectors
from utils import IMAGE_SIDE


def draw_figures(models, configs, codes, samplers, histories, scores, data, dataset, figure_dir,
                 phases):
    """Every figure of one run, into `figure_dir`. models and configs: {"VAE": ..., "AE": ...}
    (configs: each checkpoint's ModelConfig); codes: each model's test codes (VAE: posterior
    means); samplers: as metrics.make_samplers gives them; histories: each checkpoint's; scores:
    the run's metrics."""
    info, folder = utils.DATASETS[dataset], Path(figure_dir)
    images, labels = data["test"]
    axes = {name: principal_axes(model_codes) for name, model_codes in codes.items()}
    with phases("drawing the figures"):
        plot_generation(samplers, folder / "generation.png")
        plot_interpolation(models, codes, images, labels, info, folder / "interpolation.png")
        plot_latent_scatter(codes, axes, labels, info, folder / "latent_scatter.png")
        plot_reconstruction(models, codes, data["test"], info, folder / "reconstruction.png")
        plot_loss_curves(histories, folder / "loss_curves.png")
        if "VAE" in models:
            variances = scores["vae"]["posterior"]["posterior_mean_variance"]
            plot_manifold(models["VAE"], variances, info, folder / "manifold.png")
        plot_architecture(configs, folder / "architecture.png")
        if any(model.label_dim for model in models.values()):
            plot_conditional(samplers, info, folder / "conditional.png")
            plot_analogies(models, data["test"], info, folder / "analogies.png")
    with phases("drawing the GIF"):  # on the scatter's axes, so both show the same orientation
        write_latent_evolution(histories, axes, labels, info, folder / "latent_evolution.gif")
    with phases("writing the explorer page"):  # on the scatter's axes too
        write_explorer(models, configs, codes, axes, samplers, scores, data["test"], info,
                       folder / "explorer.html")


def grid_image(images, nrow):
    """(N, 1, 28, 28) in [0, 1] -> one (H, W) array of the tiles, `nrow` to a row, between grey
    lines 2 pixels wide (torchvision's make_grid, without importing torchvision: a second)."""
    tiles = images.float().cpu().reshape(-1, IMAGE_SIDE, IMAGE_SIDE).numpy()
    columns, step = min(nrow, len(tiles)), IMAGE_SIDE + 2
    rows = math.ceil(len(tiles) / columns)
    grid = np.full((rows * step + 2, columns * step + 2), 0.5, dtype=np.float32)
    for index, tile in enumerate(tiles):
        top, left = (2 + step * position for position in divmod(index, columns))
        grid[top:top + IMAGE_SIDE, left:left + IMAGE_SIDE] = tile
    return grid


def digit_grid(images, columns=8, *, scale=2, path=None):
    """A batch of images (N, 784) or (N, 28, 28) in [0, 1], as one picture, `columns` to a row:
    a PIL image, which a notebook shows as it is; written as a PNG to `path` if given.

        plots.digit_grid(vae.sample(16), path="samples.png")
    """
    images = torch.as_tensor(images)
    if images.dim() not in (2, 3) or images[0].numel() != IMAGE_SIDE * IMAGE_SIDE:
        raise ValueError(f"images: (N, 784) or (N, 28, 28) in [0, 1]; got {tuple(images.shape)}")
    pixels = (255 * grid_image(images.clamp(0, 1), columns)).round().astype(np.uint8)
    picture = Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale),
                                             Image.Resampling.NEAREST)
    if path is not None:
        utils.write_atomically(path, lambda file: picture.save(file, format="PNG"))
    return picture


def panel_title(sampler):
    """A sampler's name as a panel's title that reads alone: what the codes are drawn from, and
    what that means for the model."""
    if "Gaussian fitted" in sampler:
        return sampler.replace("Gaussian fitted", "\nGaussian fitted") + "\n(its fair chance)"
    if sampler.startswith("VAE"):
        return f"{sampler}\nthe prior it was trained to decode"
    return f"{sampler}\na prior it was never trained for"


def show(ax, image, title=None):
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=11)


def plot_generation(samplers, path, *, n_side=8, seed=0):
    """samplers: {"VAE, z ~ N(0, I)": (model, LatentGaussian), ...}. Decode codes drawn from each:
    the VAE was trained for its prior, the AE was not; a Gaussian fitted to its codes is its
    chance. A conditional model is asked for labels drawn uniformly, as its scores are."""
    figure = Figure(figsize=(4.2 * len(samplers) + 1.2, 4.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(samplers)))
    for ax, (label, (model, prior)) in zip(axes, samplers.items()):
        images = metrics.draw_samples(model, prior, n_side * n_side, seed)
        show(ax, grid_image(images, n_side), panel_title(label))
    asked = any(model.label_dim for model, _ in samplers.values())
    figure.suptitle(f"{n_side * n_side} decoded samples per sampler (the same noise for each"
                    f"{'; labels asked for drawn uniformly, the same for each' * asked})",
                    fontsize=12)
    utils.save_figure(figure, path)


MANIFOLD_LABEL = 2  # the class a conditional VAE's manifold.png decodes


def plot_manifold(model, posterior_mean_variance, dataset, path, *, n_side=20):
    """The classic 20x20 grid: decode z over the two latent dimensions whose posterior means
    vary most over the test set (all of z when it is 2-D; one row when it is 1-D), at the 5% to
    95% quantiles of N(0, 1), with every other dimension at 0; a conditional VAE's as
    MANIFOLD_LABEL, so that the grid shows the style its code carries."""
    dims = most_active_dimensions(posterior_mean_variance, 2)
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n_side))
    device = next(model.parameters()).device
    z = torch.zeros(n_side if len(dims) == 2 else 1, n_side, model.latent_dim, device=device)
    z[:, :, dims[0]] = quantiles[None, :].to(device)  # columns: left to right = low to high
    if len(dims) == 2:
        z[:, :, dims[1]] = quantiles.flip(0)[:, None].to(device)  # rows: top to bottom = high->low
    figure = Figure(figsize=(8, 8.4) if len(dims) == 2 else (8, 1.6), layout="constrained")
    ax = figure.subplots()
    label = MANIFOLD_LABEL if model.label_dim else None
    images = metrics.decode_images(model, z.reshape(-1, model.latent_dim), label)
    show(ax, grid_image(images, n_side))
    if model.latent_dim <= 2:
        title = f"VAE with a {model.latent_dim}-D latent space: decoded grid over z"
    else:
        title = (f"VAE: decoded grid over latent dimensions {dims[0]} (across) and {dims[1]} "
                 f"(down), the two most active of {model.latent_dim};\nthe other dimensions at 0; "
                 "N(0, 1) quantiles 5% to 95%")
    if label is not None:
        title += f"; each decoded as a {dataset.classes[label]} (the label)"
    ax.set_title(title, fontsize=12 if model.latent_dim <= 2 else 11)
    utils.save_figure(figure, path)


def pick_pairs(labels, class_pairs):
    """The first test index of each class in each pair; else consecutive indices."""
    pairs = []
    for k, (a, b) in enumerate(class_pairs):
        index_a, index_b = (labels == a).nonzero(), (labels == b).nonzero()
        found = len(index_a) and len(index_b)
        pairs.append((int(index_a[0]), int(index_b[0])) if found else (2 * k, 2 * k + 1))
    return pairs


def plot_interpolation(models, codes, images, labels, dataset, path, *, steps=10):
    """Decode a straight line between the codes (VAE: posterior means) of two real test images;
    a conditional model's label slides from one's to the other's with the code."""
    pairs = pick_pairs(labels, dataset.interpolation_pairs)
    rows = [(name, model, pair) for pair in pairs for name, model in models.items()]
    figure = Figure(figsize=(12, 1.25 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), 3, width_ratios=[1, steps, 1], squeeze=False)
    for row, (name, model, (a, b)) in enumerate(rows):
        ends = codes[name][[a, b]]  # (2, latent_dim)
        t = torch.linspace(0, 1, steps, device=ends.device)[:, None]  # (steps, 1)
        line = metrics.lerp(ends[0], ends[1], t)  # (steps, latent_dim)
        end_labels = label_vectors(labels[[a, b]], 2, NUM_CLASSES, ends)  # (2, 10)
        path_labels = metrics.lerp(end_labels[0], end_labels[1], t)  # (steps, 10)
        path_images = metrics.decode_images(model, line, path_labels)  # (steps, 1, 28, 28)
        real = images[[a, b]].reshape(2, 1, IMAGE_SIDE, IMAGE_SIDE)
        show(axes[row, 0], grid_image(real[:1], 1), dataset.classes[labels[a]])
        sliding = ", its label sliding from a's to b's" * bool(model.label_dim)
        show(axes[row, 1], grid_image(path_images, steps),
             f"decoded path, z = (1-t) z_a + t z_b{sliding}" if row == 0 else None)
        show(axes[row, 2], grid_image(real[1:], 1), dataset.classes[labels[b]])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=13)
    figure.suptitle(f"Interpolation between two real {dataset.title} test images in each model's "
                    "latent space", fontsize=12)
    utils.save_figure(figure, path)


def plot_reconstruction(models, codes, test, dataset, path, *, count=16):
    """The first `count` test images and each model's reconstruction: its decoded code (VAE:
    the posterior mean). test: the test images and labels."""
    images, labels = test
    rows = [("real", images[:count].reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE))]
    rows += [(name, metrics.decode_images(model, codes[name][:count], labels[:count]))
             for name, model in models.items()]
    figure = Figure(figsize=(12, 1.0 * len(rows) + 0.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(len(rows), 1))
    for ax, (name, row_images) in zip(axes, rows):
        show(ax, grid_image(row_images, count))
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=13)
    figure.suptitle(f"{dataset.title} test images and their reconstructions", fontsize=12)
    utils.save_figure(figure, path)


def plot_comparison(models, test, path, *, n_side=8, count=16, seed=0, per_row=5):
    """comparison.png: a column per run ({label: model}), `per_row` to a row: 64 decodes of
    z ~ N(0, I) (the same draws for each model of a latent size) above its reconstructions of
    the first `count` test images (test: images and labels); the first place shows real test
    images."""
    images, labels = test[0], test[1][:count]
    real = images.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    columns = [("real test images", real[count:count + n_side**2], real[:count])]
    for label, model in models.items():
        samples = metrics.draw_samples(model, None, n_side**2, seed)  # z ~ N(0, I)
        codes = metrics.codes_of(model, images[:count], labels)  # the VAE's: posterior means
        columns.append((label, samples, metrics.decode_images(model, codes, labels)))
    rows, per_row = -(-len(columns) // per_row), min(per_row, len(columns))
    figure = Figure(figsize=(2.3 * per_row, 4.4 * rows), layout="constrained")
    axes = figure.subplots(2 * rows, per_row, height_ratios=[2, 1] * rows, squeeze=False)
    for index in range(rows * per_row):
        row, column = divmod(index, per_row)
        top, bottom = axes[2 * row, column], axes[2 * row + 1, column]
        if index >= len(columns):  # the last row's empty places
            top.set_axis_off(), bottom.set_axis_off()
            continue
        label, samples, reconstructions = columns[index]
        show(top, grid_image(samples, n_side), label.replace(" ", "\n", 1))
        show(bottom, grid_image(reconstructions, count // 4))
    for row in range(rows):
        axes[2 * row, 0].set_ylabel("z ~ N(0, I)", fontsize=11)
        axes[2 * row + 1, 0].set_ylabel("reconstructions", fontsize=11)
    figure.suptitle(f"Samples from the prior (top) and reconstructions of the first {count} test "
                    "images (bottom), per run", fontsize=12)
    utils.save_figure(figure, path)


def plot_conditional(samplers, dataset, path, *, columns=10, seed=0):
    """conditional.png: each conditional sampler's samples, a row per class: each column one
    draw of z, decoded with every label, so that a column shows one style as every digit."""
    shown = {label: sampler for label, sampler in samplers.items() if sampler[0].label_dim}
    figure = Figure(figsize=(3.4 * len(shown) + 0.8, 4.2), layout="constrained")
    for ax, (label, (model, prior)) in zip(np.atleast_1d(figure.subplots(1, len(shown))),
                                           shown.items()):
        z = prior.draw(columns, torch.Generator().manual_seed(seed))  # (columns, D)
        rows = torch.arange(NUM_CLASSES).repeat_interleave(columns)  # each row one class
        device = next(model.parameters()).device
        images = metrics.decode_images(model, z.repeat(NUM_CLASSES, 1).to(device), rows)
        show(ax, grid_image(images, columns), panel_title(label))
        ax.set_yticks([2 + 30 * k + 14 for k in range(NUM_CLASSES)], dataset.classes)
    figure.suptitle(f"Asked for each {dataset.title} class (rows): {columns} draws of z "
                    "(columns), each decoded with every label", fontsize=12)
    utils.save_figure(figure, path)


def plot_analogies(models, test, dataset, path, *, count=8):
    """analogies.png: the first `count` test images (test: images and labels), each encoded with
    its own label, and its code decoded with every label: the same style, another class."""
    images, labels = test[0][:count], test[1][:count]
    figure = Figure(figsize=(5.2 * len(models) + 0.6, 0.5 * count + 0.6), layout="constrained")
    axes = figure.subplots(1, 2 * len(models), width_ratios=[1, NUM_CLASSES] * len(models),
                           squeeze=False)[0]
    for (real_ax, ax), (name, model) in zip(zip(axes[::2], axes[1::2]), models.items()):
        codes = metrics.codes_of(model, images, labels)  # (count, D)
        every = torch.arange(NUM_CLASSES).repeat(count)  # (count * 10,): each code, each label
        decoded = metrics.decode_images(model, codes.repeat_interleave(NUM_CLASSES, dim=0), every)
        show(real_ax, grid_image(images.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE), 1), "x")
        show(ax, grid_image(decoded, NUM_CLASSES), f"{name}: its code, decoded as each class")
        ax.set_xticks([2 + 30 * k + 14 for k in range(NUM_CLASSES)], dataset.classes)
    figure.suptitle(f"Analogies: {count} {dataset.title} test images, each encoded with its label "
                    "and decoded with every label", fontsize=12)
    utils.save_figure(figure, path)


def principal_axes(codes):
    """(N, D) -> (D, 2) orthonormal, on the CPU: the top two principal axes of the codes (z's own
    axes when D <= 2), each signed so that its largest component is positive, so that the latent
    scatter and the GIF show one orientation."""
    codes = codes.detach().cpu()  # an SVD every device has
    if codes.shape[1] <= 2:  # a 1-D latent space: its points on the first axis
        return torch.eye(codes.shape[1], 2, dtype=codes.dtype)
    _, _, v = torch.linalg.svd(codes - codes.mean(dim=0), full_matrices=False)  # v's rows: axes
    axes = v[:2].T
    return axes * torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))


def plane_limit(points):
    """Half the side of a square view of 2-D points (N, 2) around the origin: all but the outer
    0.2% of them, and at least the prior's 3 sd, with a margin."""
    return 1.15 * max(3.5, float(np.quantile(np.abs(points), 0.998)))


def most_active_dimensions(posterior_mean_variance, count):
    """The `count` latent dimensions whose posterior means vary most over the test set."""
    variances = torch.tensor(posterior_mean_variance)
    return variances.topk(min(count, len(variances))).indices.tolist()


def axis_names(latent_dim):
    names = {1: ("z[0]", "(a 1-D latent space)"), 2: ("z[0]", "z[1]")}
    return names.get(latent_dim, ("principal axis 1", "principal axis 2"))


def draw_codes(ax, points, labels, *, title, axis_labels):
    """Scatter 2-D points coloured by class, with the N(0, I) circles at 1, 2 and 3 standard
    deviations; returns the scatter."""
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5,
                         s=6, linewidths=0, alpha=0.6, rasterized=True)  # no edges: 2x faster
    circle_t = np.linspace(0, 2 * np.pi, 200)
    for radius in (1, 2, 3):
        ax.plot(radius * np.cos(circle_t), radius * np.sin(circle_t), "k--", lw=0.8,
                label="N(0, I): 1, 2, 3 sd" if radius == 1 else None)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title, fontsize=11)
    ax.legend(loc="upper right", fontsize=8)
    return scatter


def class_colorbar(figure, scatter, axes, dataset):
    colorbar = figure.colorbar(scatter, ax=list(axes), ticks=range(10))
    colorbar.ax.set_yticklabels(dataset.classes)
    colorbar.set_label("class (used only for colour)")


def plot_latent_scatter(codes, axes_of, labels, dataset, path):
    """The test set's codes (VAE: posterior means) on their principal axes `axes_of[name]`,
    coloured by class, with circles at 1, 2 and 3 sd of N(0, I). The projection is orthonormal
    and not centred, so N(0, I) still looks like N(0, I)."""
    figure = Figure(figsize=(5.6 * len(codes) + 1.6, 5.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(codes)))
    labels = labels.cpu().numpy()
    for ax, (name, model_codes) in zip(axes, codes.items()):
        # NumPy: matplotlib reads a tensor element by element (0.15 s for the figure)
        points = (model_codes.float().cpu() @ axes_of[name].float()).numpy()
        scatter = draw_codes(ax, points, labels, axis_labels=axis_names(model_codes.shape[1]),
                             title=f"{name}: {model_codes.shape[1]}-D codes of the test set")
        ax.set_aspect("equal", adjustable="datalim")
    class_colorbar(figure, scatter, axes, dataset)
    figure.suptitle(f"Latent codes of {dataset.title} test images (VAE: posterior means) against "
                    "the N(0, I) prior", fontsize=12)
    utils.save_figure(figure, path)


def write_latent_evolution(histories, axes_of, labels, dataset, path, *, seconds_per_frame=0.25):
    """Animate the test codes each history recorded (history[i]["codes"]: (n, D) float16) as a
    GIF, one frame per recorded epoch, on the latent scatter's principal axes `axes_of`. The
    figure is drawn once; each frame redraws only the points, the circles and the title over it
    (6x faster than a figure per frame) and pastes the legends back."""

    recorded = [{r["epoch"] for r in history if "codes" in r} for history in histories.values()]
    epochs = sorted(set.intersection(*recorded))
    if not epochs:
        return
    points = {name: {r["epoch"]: (r["codes"].float() @ axes_of[name].float().cpu()).numpy()
                     for r in history if "codes" in r} for name, history in histories.items()}
    latent_dims = {name: len(axes) for name, axes in axes_of.items()}
    labels = labels[:len(next(iter(points.values()))[epochs[-1]])].cpu().numpy()  # (n,)
    figure, canvas, scatters, title = evolution_figure(points, latent_dims, epochs[-1], labels,
                                                       dataset)
    background = canvas.copy_from_bbox(figure.bbox)
    # the legends' pixels, pasted over each frame in microseconds (drawn: 3 ms each)
    legends = [canvas.copy_from_bbox(scatter.axes.get_legend().get_window_extent())
               for scatter in scatters.values()]
    frames, palette = [], None
    for epoch in epochs:
        canvas.restore_region(background)
        for name, scatter in scatters.items():
            scatter.set_offsets(points[name][epoch])
            for artist in [scatter, *scatter.axes.lines]:
                scatter.axes.draw_artist(artist)  # the points, then the circles over them
        for legend in legends:
            canvas.restore_region(legend)
        title.set_text(f"{dataset.title} test codes after epoch {epoch}")
        figure.draw_artist(title)
        frame = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
        palette = palette or frame.quantize(colors=64)  # one palette for all: 15x faster
        frames.append(frame.quantize(palette=palette, dither=Image.Dither.NONE))
    durations = [int(1000 * seconds_per_frame)] * (len(frames) - 1) + [2000]  # hold the last
    utils.write_atomically(path, lambda file: frames[0].save(
        file, format="GIF", save_all=True, append_images=frames[1:], duration=durations,
        loop=0))


def evolution_figure(points, latent_dims, last_epoch, labels, dataset):
    """The GIF's figure, drawn once without its points and title: (figure, canvas, {name:
    scatter}, title). Each panel's limits fit the last epoch's points."""
    figure = Figure(figsize=(4.6 * len(points) + 1.6, 4.8), dpi=80, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = np.atleast_1d(figure.subplots(1, len(points)))
    scatters = {}
    for ax, (name, by_epoch) in zip(axes, points.items()):
        last = by_epoch[last_epoch]
        scatters[name] = draw_codes(ax, last, labels, title=name,
                                    axis_labels=axis_names(latent_dims[name]))
        limit = plane_limit(last)
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal")
    class_colorbar(figure, scatters[name], axes, dataset)
    title = figure.suptitle(f"{dataset.title} test codes after epoch {last_epoch}", fontsize=12)
    figure.draw_without_rendering()  # lays the figure out, with every artist in place
    figure.set_layout_engine("none")
    for artist in [*scatters.values(), title]:
        artist.set_visible(False)
    canvas.draw()
    for artist in [*scatters.values(), title]:
        artist.set_visible(True)
    return figure, canvas, scatters, title


def plot_loss_curves(histories, path):
    """histories: {"VAE": history, ...}; per epoch the train loss (a running mean over the epoch)
    and the test loss, and for the VAE its test loss's two parts, the reconstruction term (BCE)
    and the KL term, on a log scale, so that the first epoch and the KL term both show."""
    figure = Figure(figsize=(5.0 * len(histories), 4.0), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(histories)))
    for ax, (name, history) in zip(axes, histories.items()):
        epochs = [record["epoch"] for record in history]
        style = "o-" if len(history) <= 60 else "-"
        variational = "kl" in history[-1]["test"]
        total = "negative ELBO" if variational else "BCE"
        trained_on = "the negative IWAE bound, " if "iwae" in history[-1]["train"] else ""
        ax.plot(epochs, [record["train"]["loss"] for record in history], style, ms=3,
                label=f"train ({trained_on}running mean over the epoch)")
        ax.plot(epochs, [record["test"]["loss"] for record in history], style, ms=3,
                label=f"test: {total}" + (" = BCE + KL" if variational else ""))
        if variational:
            for part, label in (("bce", "test: BCE, the reconstruction term"),
                                ("kl", "test: KL(q(z | x) || N(0, I))")):
                ax.plot(epochs, [record["test"][part] for record in history], "--", lw=1.2,
                        label=label)
        ax.set_yscale("log")
        for axis_format in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis_format(FormatStrFormatter("%g"))  # 60, not 6 x 10^1
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("nats per image (log scale)")
        ax.set_title(f"{name}: its loss, {total}", fontsize=11)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    utils.save_figure(figure, path)


def plot_latent_study(study, path):
    """One panel per reconstruction score, and the VAE's test negative ELBO, against the latent
    size."""
    sizes = [int(size) for size in study]
    panels = [("mse", "test MSE per pixel"), ("psnr", "test PSNR (dB)"), ("ssim", "test SSIM"),
              ("test_loss", "VAE test negative ELBO (nats)")]
    figure = Figure(figsize=(16, 3.8), layout="constrained")
    for ax, (key, title) in zip(figure.subplots(1, len(panels)), panels):
        for kind, marker in (("vae", "o-"), ("ae", "s-")):
            if key == "test_loss" and kind == "ae":
                continue  # the AE's loss is its BCE: no likelihood bound, not comparable
            points = [(size, row[kind][key]) for size, row in zip(sizes, study.values())
                      if kind in row]
            if points:
                ax.plot(*zip(*points), marker, label=kind.upper())
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(size) for size in sizes])
        ax.set_xlabel("latent size")
        ax.set_title(title, fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle("Latent-size study: reconstruction of the test set (decoded posterior means "
                    "/ codes)", fontsize=12)
    utils.save_figure(figure, path)


# ------------------------------------------------------------------ the explorer page

EXPLORER_TEMPLATE = "explorer_template.html"  # beside this file: the HTML, CSS and JavaScript
EXPLORER_DATA_MARK = "/*EXPLORER_DATA*/"  # where the template takes the page's data, as JSON


def write_explorer(models, configs, codes, axes_of, samplers, scores, test, dataset, path, *,
                   dots=800, grid_side=25, samples=32):
    """explorer.html: one self-contained page where each model decodes the point under the pointer
    on the plane of its principal axes `axes_of[name]` (those of latent_scatter.png), plus samples,
    interpolations and the VAE's most active dimensions. MLP decoders run in the page's JavaScript;
    others show the nearest of a `grid_side`^2 grid decoded here (a conditional model's: a smaller
    grid for each label). test: (images (N, 784) in [0, 1], labels (N,)); the first `dots` are the
    page's dots and interpolation ends. A conditional run's page has a picker of the label."""
    images, labels = test
    count = min(dots, len(images))
    variances = scores.get("vae", {}).get("posterior", {}).get("posterior_mean_variance")
    payload = {
        "title": dataset.title, "classes": list(dataset.classes), "colors": tab10_colors(),
        "dots": {"count": count, "labels": labels[:count].tolist(),
                 "images": image_bytes(images[:count])},
        "initialPair": list(pick_pairs(labels[:count], dataset.interpolation_pairs)[0]),
        "models": [explorer_model(name, model, configs[name], codes[name], axes_of[name],
                                  variances if name == "VAE" else None, test, count=count,
                                  grid_side=grid_side) for name, model in models.items()],
        "samplers": [explorer_sampler(label, model, prior, models, configs, count=samples)
                     for label, (model, prior) in samplers.items()],
    }
    template = (Path(__file__).parent / EXPLORER_TEMPLATE).read_text(encoding="utf-8")
    page = template.replace(EXPLORER_DATA_MARK, page_json(payload))
    utils.write_atomically(path, lambda file: file.write(page.encode("utf-8")))


def page_json(payload):
    """JSON that is safe inside <script>: no "</script>" can end it early."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")


def image_bytes(images):
    """Images (N, 784) in [0, 1] as base64 text of one byte a pixel, row by row."""
    return base64_of((images * 255).round(), "u1")


def base64_of(tensor, dtype):
    """A tensor's values as base64 text of little-endian `dtype` ("<f4", "<f2", "u1"), row-major."""
    array = np.ascontiguousarray(tensor.detach().float().cpu().numpy().astype(dtype))
    return base64.b64encode(array.tobytes()).decode("ascii")


def tab10_colors():
    return [to_hex(color) for color in colormaps["tab10"].colors]  # latent_scatter.png's classes


def explorer_model(name, model, config, codes, axes, variances, test, *, count, grid_side):
    """One model's part of the page: its plane, the codes (N, D) of the first `count` test
    images (test: images and labels) and the VAE's posterior log-variances of them, its encoder
    and decoder (MLP layers) or else a grid of decodes, and for the VAE its most active
    dimensions."""
    codes = codes.detach().float().cpu()
    plane = latent_plane(codes, axes.detach().float().cpu())
    live = runs_in_page(model, config)
    grid = None if live else plane_grid(model, plane, grid_side * 3 // 5 if model.label_dim
                                        else grid_side)
    logvars = metrics.posteriors_of(model, test[0][:count], test[1][:count])[1] \
        if isinstance(model, VAE) else None
    return {"name": name, "latentDim": codes.shape[1], "arch": config.arch,
            "conditional": bool(model.label_dim), "variational": logvars is not None, **plane,
            "axisNames": list(axis_names(codes.shape[1])), "codes": base64_of(codes[:count], "<f4"),
            "logvars": None if logvars is None else base64_of(logvars, "<f4"),
            "layers": decoder_layers(model) if live else None,
            "encoder": encoder_layers(model) if live else None, "grid": grid,
            "activeDims": active_dimensions(variances) if variances else []}


def latent_plane(codes, axes):
    """codes (N, D), axes (D, 2) orthonormal -> the plane the page shows: a point (u, v) is
    z = m_perp + u a1 + v a2, where m_perp is the codes' mean without its a1, a2 components (the
    other coordinates held at the mean); `limit`: half its side, fitted as the GIF's panels are."""
    points = (codes @ axes).numpy()  # (N, 2), not centred: as latent_scatter.png
    mean = codes.mean(dim=0)
    m_perp = mean - axes @ (axes.T @ mean)
    return {"axes": axes.T.tolist(), "mean": mean.tolist(), "mPerp": m_perp.tolist(),
            "limit": plane_limit(points)}


def runs_in_page(model, config):
    """Whether the page can run this encoder and decoder itself: MLPs, Linear and ReLU only."""
    return config.arch == "mlp" and all(
        isinstance(network, nn.Sequential) and all(isinstance(layer, (nn.Linear, nn.ReLU))
                                                   for layer in network)
        for network in (model.encoder, model.decoder))


def decoder_layers(model):
    """The MLP decoder for the page (mlp_layers). Measured on the reference pair: float16 keeps
    the page small (2.8 MB against 4.5 MB in float32, before the encoders) and its decodes within
    0.3/255 of torch's, in Chromium, at test codes, N(0, I) draws and the AE's fitted Gaussian;
    the first layer (D x hidden: small, and fed z itself) stays float32, which halves that error
    (float16 throughout: 0.57/255)."""
    return mlp_layers(model.decoder, exact=0)


def encoder_layers(model):
    """The MLP encoder for the page (mlp_layers): the first layers (784 x hidden: most of the
    weights) in float16, the last (hidden x D, which makes the code) in float32: the codes of
    5,000 test images within 0.9e-3 of torch's for the reference pair (float16 throughout:
    1.9e-3)."""
    return mlp_layers(model.encoder, exact=-1)


def mlp_layers(sequential, *, exact):
    """An MLP as [{"in", "out", "relu", "dtype", "weight", "bias"}], each weight (in, out)
    row-major, so that the page adds one input's row at a time, skipping the zeros of a ReLU;
    float16 weights but those of the Linear layer at index `exact`, float32."""
    linear = [layer for layer in sequential if isinstance(layer, nn.Linear)]
    layers = []
    for index, layer in enumerate(linear):
        dtype = "<f4" if index == range(len(linear))[exact] else "<f2"
        layers.append({"in": layer.in_features, "out": layer.out_features,
                       "relu": index < len(linear) - 1,  # a ReLU after every Linear but the last
                       "dtype": {"<f2": "float16", "<f4": "float32"}[dtype],
                       "weight": base64_of(layer.weight.T, dtype),
                       "bias": base64_of(layer.bias, "<f4")})
    return layers


def plane_grid(model, plane, side):
    """The decodes of a side x side grid over the plane, for a decoder the page cannot run: rows
    from v = +limit down to -limit, columns from u = -limit to +limit, as bytes (side^2, 784);
    one grid, or a conditional model's one for each label."""
    steps = torch.linspace(-plane["limit"], plane["limit"], side)
    u, v = steps.repeat(side), steps.flip(0).repeat_interleave(side)  # (side^2,) each
    a1, a2 = torch.tensor(plane["axes"])  # (D,) each
    z = torch.tensor(plane["mPerp"]) + u[:, None] * a1 + v[:, None] * a2  # (side^2, D)
    device = next(model.parameters()).device
    labels = range(NUM_CLASSES) if model.label_dim else [None]
    return {"side": side, "images": [image_bytes(metrics.decode_images(
        model, z.to(device), label).reshape(side * side, -1)) for label in labels]}


def active_dimensions(posterior_mean_variance, *, count=4):
    """The VAE's `count` most active dimensions, as plot_manifold picks them."""
    variances = torch.tensor(posterior_mean_variance)  # float32, as the page has always shown them
    return [{"dim": dim, "variance": float(variances[dim])}
            for dim in most_active_dimensions(posterior_mean_variance, count)]


def explorer_sampler(label, model, prior, models, configs, *, count, seed=0):
    """One sampler of metrics.make_samplers for the page: its Gaussian (mean, scale_tril), and
    where the page cannot run the decoder `count` decoded draws (a conditional model's: 8 for
    each label)."""
    name = next(name for name, candidate in models.items() if candidate is model)
    images = None
    if not runs_in_page(model, configs[name]) and model.label_dim:
        generator = torch.Generator().manual_seed(seed)
        images = [image_bytes(model.sample(8, asked, prior=prior, generator=generator))
                  for asked in range(NUM_CLASSES)]
    elif not runs_in_page(model, configs[name]):
        images = [image_bytes(metrics.draw_samples(model, prior, count, seed))]
    return {"label": label, "model": name, "mean": prior.mean.float().cpu().tolist(),
            "scaleTril": prior.scale_tril.float().cpu().tolist(), "images": images}


# ------------------------------------------------------------------ the architecture diagram

BLOCK_COLOURS = {"data": "#eeeeee", "encoder": "#d6e6f5", "code": "#d9d9d9", "decoder": "#d9f0d3",
                 "vae": "#ffd8a8", "loss": "#f2e4f7", "label": "#fff1a8"}
BLOCK_NAMES = {"encoder": "encoder", "code": "code z", "decoder": "decoder",
               "vae": "added by the VAE", "loss": "training loss", "label": "the label y"}


def plot_architecture(configs, path):
    """architecture.png: each model's layers, with their sizes, from its config."""
    utils.save_figure(architecture_figure(configs), path)


def architecture_figure(configs):
    """One panel per model (configs: {"AE": ModelConfig, "VAE": ...}), AE first, so that the VAE's
    additions (in orange: two heads, the sampling of z, the KL term) line up against the AE."""
    names = sorted(configs, key=lambda name: name != "AE")
    steps = {name: model_steps(configs[name]) for name in names}
    rows = {name: architecture_rows(configs[name], *steps[name]) for name in names}
    height = 0.62 * max(len(panel) for panel in rows.values()) + 1.7
    longest = max(len(block[0]) for panel in rows.values() for row in panel for block in row)
    figure = Figure(figsize=(max(5.6, 0.07 * longest) * len(names), height), layout="constrained")
    for ax, name in zip(np.atleast_1d(figure.subplots(1, len(names))), names):
        draw_blocks(ax, rows[name])
        ax.set_title(f"{name}{ARCH_TITLES.get(configs[name].arch, '')}\n"
                     f"{size_chain(configs[name], *steps[name])}", fontsize=11)
    kinds = {block[1] for panel in rows.values() for row in panel for block in row}
    handles = [Patch(facecolor=BLOCK_COLOURS[kind], edgecolor="#555", label=label)
               for kind, label in BLOCK_NAMES.items() if kind in kinds]
    figure.legend(handles=handles, loc="outside lower center", fontsize=9,
                  ncols=min(len(handles), 3 * len(names)))
    figure.suptitle(f"{' and '.join(names)}: the layers and their output sizes, "
                    + ("from each checkpoint's config" if len(names) > 1 else
                       "\nfrom the checkpoint's config")  # one panel: too narrow for a line
                    + (" (the VAE is the AE plus the orange parts)" if len(names) > 1 else ""),
                    fontsize=12)
    return figure


ARCH_TITLES = {"conv": " (convolutional)", "resnet": " (residual blocks, attention)"}


def model_steps(config):
    """(encoder steps, decoder steps) of the model `config` builds, each [label, output size], from
    the model itself run on one blank image on the CPU (the meta device's first use costs a second),
    its random initial weights drawn outside torch's global random state."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = build_model(config).eval()
        labels = model.label_dim  # a conditional model's inputs end with the one-hot label
        encoder, _ = layer_steps(model.encoder, torch.zeros(1, config.image_dim + labels))
        decoder, _ = layer_steps(model.decoder, torch.zeros(1, config.latent_dim + labels))
    return encoder, decoder


def layer_steps(sequential, x):
    """Run x (one blank input) through `sequential`'s layers: ([label, output size] per Linear or
    convolution, a ReLU or a reshape after it joined to it; the output)."""
    steps = []
    for layer in diagram_layers(sequential):
        x = layer(x)
        size = " x ".join(str(n) for n in x.shape[1:])
        if isinstance(layer, (nn.ReLU, nn.SiLU, nn.GroupNorm)):
            steps[-1][0] += f" + {type(layer).__name__}"
        elif isinstance(layer, (ResBlock, SelfAttention)):
            per_class = ", FiLM(y)" * hasattr(layer, "label_scale_shift")  # per-class scale, shift
            steps.append([DIAGRAM_BLOCKS[type(layer)] + per_class, size])
        elif isinstance(layer, nn.Unflatten) and steps:
            steps[-1][1] += f" = {size}"
        elif isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            kind = "Conv" if isinstance(layer, nn.Conv2d) else "ConvTranspose"
            steps.append([f"{kind} {layer.kernel_size[0]}x{layer.kernel_size[1]}, stride "
                          f"{layer.stride[0]}", size])
        elif isinstance(layer, nn.Linear):
            steps.append(["Linear", size])
        # a Flatten, or the encoder's first reshape: the next layer's input says it
    return steps, x


DIAGRAM_BLOCKS = {ResBlock: "residual block (GroupNorm, SiLU, 3x3 conv) x 2",
                  SelfAttention: "self-attention over the positions"}


def diagram_layers(module):
    """The layers of `module` in order, a residual or attention block as one layer."""
    for child in module.children():
        if isinstance(child, tuple(DIAGRAM_BLOCKS)) or not list(child.children()):
            yield child
        else:
            yield from diagram_layers(child)


def architecture_rows(config, encoder, decoder):
    """The diagram's rows, top to bottom: each a list of blocks (text, kind, role) side by side.
    Roles: "main" and "head" blocks take arrows from the row above; a "side" block points into its
    row's main block; the "term" (KL) takes the heads' arrow. An empty row keeps the AE's layers
    level with the VAE's."""
    d, vae = config.latent_dim, config.kind == "vae"
    image = f"x: a {IMAGE_SIDE} x {IMAGE_SIDE} image, {config.image_dim} pixels"
    label_block = [(f"y, one-hot: {NUM_CLASSES}", "label", "side")] * (
        config.condition == "label")  # beside the encoder's input and the decoder's
    rows = [[(image, "data", "main"), *label_block]]
    rows += [[(f"{label}: {size}", "encoder", "main")] for label, size in encoder[:-1]]
    last = f"{encoder[-1][0]}: {2 * d} = 2 x {d}" if vae else f"{encoder[-1][0]}: {d}"
    rows.append([(last, "encoder", "main")])
    if vae:
        rows.append([(rf"$\mu$: {d}", "vae", "head"), (rf"$\log\sigma^2$: {d}", "vae", "head")])
        rows.append([(rf"$z = \mu + \sigma \odot \varepsilon$: {d}", "vae", "main"),
                     (r"$\varepsilon \sim \mathcal{N}(0, I)$", "vae", "side")])
    else:
        rows += [[], [(f"code z: {d}", "code", "main")]]
    decoder_rows = [[(f"{text}: {size}", "decoder", "main")] for text, size in decoder]
    decoder_rows[0] += label_block
    rows += decoder_rows
    rows[-1][0] = (rows[-1][0][0] + " logits", "decoder", "main")
    rows.append([(rf"$\hat{{x}}$ = sigmoid(logits): {config.image_dim}", "data", "main")])
    given = r", y" * bool(label_block)  # a conditional model's distributions are given y
    reconstruction = ("loss: the reconstruction term\n"
                      rf"BCE$(x, \hat{{x}}) = -\log p(x \mid z{given})$")
    loss = [(reconstruction, "loss", "main")]
    if vae:  # beside it: the KL term, weighted by beta (1: the loss is the negative ELBO)
        loss.append((rf"+ $\beta\,$KL$(q(z \mid x{given})\ \|\ \mathcal{{N}}(0, I))$" "\n"
                     rf"the KL term, $\beta$ = {config.beta:g}", "vae", "term"))
    return rows + [loss]


BLOCK_X = {"main": 0.5, "head": (0.3, 0.7), "side": 0.84}
LOSS_X = {"main": 0.28, "term": 0.74}  # the KL term beside the reconstruction term


def draw_blocks(ax, rows):
    """One model's panel: its rows of blocks, top to bottom, with arrows between them."""
    ax.set(xlim=(0, 1), ylim=(-0.7, len(rows) - 0.4))
    ax.axis("off")
    placed = []  # per row: [(text artist, role, y)]
    for index, row in enumerate(rows):
        y, heads = len(rows) - 1 - index, iter(BLOCK_X["head"])
        in_loss_row = index == len(rows) - 1 and len(row) == 2
        placed.append([])
        for text, kind, role in row:
            x = LOSS_X[role] if in_loss_row else next(heads) if role == "head" else BLOCK_X[role]
            artist = ax.text(x, y, text, ha="center", va="center", fontsize=9.5, bbox={
                "boxstyle": "round,pad=0.45", "facecolor": BLOCK_COLOURS[kind],
                "edgecolor": "#d9822b" if kind == "vae" else "#666",
                "linewidth": 1.6 if kind == "vae" else 0.8})
            placed[-1].append((artist, role, y))
    draw_arrows(ax, [row for row in placed if row])


def arrow(ax, source, target, *, start=(0.5, 0), end=(0.5, 1), **style):
    """An arrow from a point of `source` (an artist's box, in fractions of it; or a data point
    with source "data") to a point of `target`."""
    ax.annotate("", xy=end, xycoords=target, xytext=start, textcoords=source, arrowprops={
        "arrowstyle": "-|>", "color": "#444", "shrinkA": 5, "shrinkB": 5, "lw": 1.0, **style})


def draw_arrows(ax, filled):
    """filled: the rows that have blocks, [(artist, role, y)]. Main and head blocks flow into the
    next row's; a side block points into its main block; the heads feed the KL term, along the
    right-hand edge."""
    flowing = [[block for block in row if block[1] in ("main", "head")] for row in filled]
    for above, below in zip(flowing, flowing[1:]):
        for source, _, _ in above:
            for target, _, _ in below:
                arrow(ax, source, target)
    for row in filled:
        for side in (artist for artist, role, _ in row if role == "side"):
            arrow(ax, side, row[0][0], start=(0, 0.5), end=(1, 0.5))
    heads = [block for row in filled for block in row if block[1] == "head"]
    terms = [block for row in filled for block in row if block[1] == "term"]
    if heads and terms:  # out of mu (over the heads) and log sigma^2 to the right, down the edge,
        (head, _, top), (term, _, bottom) = heads[-1], terms[0]  # into the KL term
        orange = {"color": "#d9822b", "lw": 1.3}
        rows = [row[0][2] for row in filled]  # each row's y
        above = (top + rows[rows.index(top) - 1]) / 2  # halfway up to the row above the heads
        arrow(ax, head, "data", start=(1, 0.5), end=(0.97, top), arrowstyle="-", shrinkB=0,
              **orange)
        if len(heads) > 1:
            arrow(ax, heads[-2][0], "data", start=(0.5, 1), end=(0.97, above), arrowstyle="-",
                  shrinkB=0, connectionstyle="angle,angleA=90,angleB=0,rad=0", **orange)
        ax.plot([0.97, 0.97], [above if len(heads) > 1 else top, bottom], **orange)
        ax.text(0.985, (top + bottom) / 2, r"$\mu$ and $\log\sigma^2$", rotation=90, ha="center",
                va="center", fontsize=9, color="#d9822b")  # the KL term reads both heads
        arrow(ax, "data", term, start=(0.97, bottom), end=(1, 0.5), shrinkA=0, **orange)


def size_chain(config, encoder, decoder):
    """The title's '784 -> 400 -> 20 -> 400 -> 784': the size after each layer (the VAE's heads:
    2 x 20; not after residual blocks and attention, which keep it), split at the code z over two
    lines when long."""
    def short(steps):  # the sizes after each step but the last
        return [size.split(" = ")[-1].replace(" x ", "x") for label, size in steps[:-1]
                if not label.startswith(tuple(DIAGRAM_BLOCKS.values()))]

    d, y = config.latent_dim, f" + {NUM_CLASSES}" * (config.condition == "label")
    code = [f"2 x {d}", f"{d}{y}"] if config.kind == "vae" else [f"{d}{y}"]
    first = [f"{config.image_dim}{y}", *short(encoder), *code]
    second = [*short(decoder), str(config.image_dim)]
    chain = " \u2192 ".join(first + second)
    if len(chain) <= 60:
        return chain
    return " \u2192 ".join(first) + " \u2192\n" + " \u2192 ".join(second)
