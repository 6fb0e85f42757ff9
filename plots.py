"""Every picture a run writes: samples, reconstructions, interpolations, the VAE's manifold, the
latent scatter and its GIF, the loss curves and the latent-size study. Computes no score (the
numbers come from metrics.py) and writes every file through utils' atomic writes.

Figures take dicts keyed by display names ({"VAE": ..., "AE": ...}): one model or both alike."""
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import metrics
import utils
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
        plot_reconstruction(models, codes, images, info, folder / "reconstruction.png")
        plot_loss_curves(histories, folder / "loss_curves.png")
        if "VAE" in models:
            variances = scores["vae"]["posterior"]["posterior_mean_variance"]
            plot_manifold(models["VAE"], variances, folder / "manifold.png")
    with phases("drawing the GIF"):  # on the scatter's axes, so both show the same orientation
        write_latent_evolution(histories, axes, labels, info, folder / "latent_evolution.gif")


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


def show(ax, image, title=None):
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=11)


def plot_generation(samplers, path, *, n_side=8, seed=0):
    """samplers: {"VAE, z ~ N(0, I)": (model, Gaussian), ...}. Decode codes drawn from each: the
    VAE was trained for its prior, the AE was not; a Gaussian fitted to its codes is its chance."""
    figure = Figure(figsize=(4.2 * len(samplers) + 1.2, 4.8), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(samplers)))
    for ax, (label, (model, gaussian)) in zip(axes, samplers.items()):
        images = metrics.decode_images(model, gaussian.sample(n_side * n_side, seed))
        show(ax, grid_image(images, n_side), label.replace("Gaussian fitted", "\nGaussian fitted"))
    figure.suptitle(f"{n_side * n_side} decoded samples per sampler (the same noise for each)",
                    fontsize=12)
    utils.save_figure(figure, path)


def plot_manifold(model, posterior_mean_variance, path, *, n_side=20):
    """The classic 20x20 grid: decode z over the two latent dimensions whose posterior means
    vary most over the test set (all of z when it is 2-D; one row when it is 1-D), at the 5% to
    95% quantiles of N(0, 1), with every other dimension at 0."""
    dims = torch.tensor(posterior_mean_variance).topk(min(2, model.latent_dim)).indices.tolist()
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n_side))
    device = next(model.parameters()).device
    z = torch.zeros(n_side if len(dims) == 2 else 1, n_side, model.latent_dim, device=device)
    z[:, :, dims[0]] = quantiles[None, :].to(device)  # columns: left to right = low to high
    if len(dims) == 2:
        z[:, :, dims[1]] = quantiles.flip(0)[:, None].to(device)  # rows: top to bottom = high->low
    figure = Figure(figsize=(8, 8.4) if len(dims) == 2 else (8, 1.6), layout="constrained")
    ax = figure.subplots()
    show(ax, grid_image(metrics.decode_images(model, z.reshape(-1, model.latent_dim)), n_side))
    if model.latent_dim <= 2:
        title = f"VAE with a {model.latent_dim}-D latent space: decoded grid over z"
    else:
        title = (f"VAE: decoded grid over latent dimensions {dims[0]} (across) and {dims[1]} "
                 f"(down), the two most active of {model.latent_dim};\nthe other dimensions at 0; "
                 "N(0, 1) quantiles 5% to 95%")
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
    """Decode a straight line between the codes (VAE: posterior means) of two real test images."""
    pairs = pick_pairs(labels, dataset.interpolation_pairs)
    rows = [(name, model, pair) for pair in pairs for name, model in models.items()]
    figure = Figure(figsize=(12, 1.25 * len(rows) + 0.6), layout="constrained")
    axes = figure.subplots(len(rows), 3, width_ratios=[1, steps, 1], squeeze=False)
    for row, (name, model, (a, b)) in enumerate(rows):
        ends = codes[name][[a, b]]  # (2, latent_dim)
        t = torch.linspace(0, 1, steps, device=ends.device)[:, None]  # (steps, 1)
        path_images = metrics.decode_images(model, (1 - t) * ends[0] + t * ends[1])  # (steps, 1, 28, 28)
        real = images[[a, b]].reshape(2, 1, IMAGE_SIDE, IMAGE_SIDE)
        show(axes[row, 0], grid_image(real[:1], 1), dataset.classes[labels[a]])
        show(axes[row, 1], grid_image(path_images, steps),
             "decoded path, z = (1-t) z_a + t z_b" if row == 0 else None)
        show(axes[row, 2], grid_image(real[1:], 1), dataset.classes[labels[b]])
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=13)
    figure.suptitle(f"Interpolation between two real {dataset.title} test images in each model's "
                    "latent space", fontsize=12)
    utils.save_figure(figure, path)


def plot_reconstruction(models, codes, images, dataset, path, *, count=16):
    """The first `count` test images and each model's reconstruction: its decoded code (VAE:
    the posterior mean)."""
    rows = [("real", images[:count].reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE))]
    rows += [(name, metrics.decode_images(model, codes[name][:count])) for name, model in models.items()]
    figure = Figure(figsize=(12, 1.0 * len(rows) + 0.6), layout="constrained")
    axes = np.atleast_1d(figure.subplots(len(rows), 1))
    for ax, (name, row_images) in zip(axes, rows):
        show(ax, grid_image(row_images, count))
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=13)
    figure.suptitle(f"{dataset.title} test images and their reconstructions", fontsize=12)
    utils.save_figure(figure, path)


def principal_axes(codes):
    """(N, D) -> (D, 2) orthonormal: the top two principal axes of the codes (z's own axes when
    D <= 2), each signed so that its largest component is positive, so that the latent scatter
    and the GIF show one orientation."""
    if codes.shape[1] <= 2:  # a 1-D latent space: its points on the first axis
        return torch.eye(codes.shape[1], 2, dtype=codes.dtype, device=codes.device)
    _, _, v = torch.linalg.svd(codes - codes.mean(dim=0), full_matrices=False)  # v's rows: axes
    axes = v[:2].T
    return axes * torch.sign(axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)))


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
        points = (model_codes.float() @ axes_of[name]).cpu().numpy()
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
    from PIL import Image  # Pillow: installed with matplotlib

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
    utils.write_atomically(path, lambda temporary: frames[0].save(
        temporary, format="GIF", save_all=True, append_images=frames[1:], duration=durations,
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
        limit = 1.15 * max(3.5, float(np.quantile(np.abs(last), 0.998)))
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
    """histories: {"VAE": history, ...}; the train (running mean over each epoch) and test loss
    per epoch. The y axis fits the epochs after the first, whose higher loss would flatten them."""
    figure = Figure(figsize=(5.0 * len(histories), 4.0), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(histories)))
    for ax, (name, history) in zip(axes, histories.items()):
        epochs = [record["epoch"] for record in history]
        style = "o-" if len(history) <= 60 else "-"
        for split, label in (("train", "train (running mean over the epoch)"), ("test", "test")):
            ax.plot(epochs, [record[split]["loss"] for record in history], style, ms=3, label=label)
        if len(history) > 2:
            later = [r[split]["loss"] for r in history[max(1, len(history) // 50):]
                     for split in ("train", "test")]
            margin = 0.1 * (max(later) - min(later)) + 0.1
            ax.set_ylim(min(later) - margin, max(later) + margin)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("loss per image (nats)")
        ax.set_title(f"{name}: {'negative ELBO' if 'kl' in history[-1]['test'] else 'BCE'}",
                     fontsize=11)
        ax.grid(alpha=0.3)
        ax.legend()
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
