"""Every number in metrics.json: the losses, the reconstructions' errors, the codes' statistics,
the IWAE bound on -log p(x), the sample scores, and the small CNN behind those scores, which never
trains the VAE or the AE. Draws no picture and writes only the classifiers' caches: the scoring
CNN's and, trained the same way but another network, the perceptual loss's
(models.PerceptualNet)."""
import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import checkpoint_files
import utils
from models import (NUM_CLASSES, VAE, LatentGaussian, PerceptualNet, bernoulli_nll_per_image,
                    code_moments, kl_per_dimension, label_vectors, reparameterize)
from utils import IMAGE_SIDE

CLASSIFIER_DIR = Path("checkpoints")  # one scoring classifier per dataset, for every run


METRICS_NOTES = (  # what each number in metrics.json means, written into it as "notes"
    "Losses are per image in nats: the VAE's is the negative ELBO with one z per image (from a "
    "fixed seed), the AE's its BCE; targets are grey pixels as Bernoulli targets unless 'binarize' "
    "says otherwise (then the test set is one fixed Bernoulli sample). test_nll_iwae: importance-"
    "weighted estimate of -log p(x) with that many samples. reconstruction: decoded code (VAE: "
    "posterior mean) against the test image; mse per pixel, psnr in dB (peak 1) and ssim (11x11 "
    "Gaussian window) against grey pixels. samples: decoded samples scored by the project's "
    "classifier of the dataset's ten classes (frechet_distance of its 128-D features to the test "
    "set's; share classified with confidence > 0.9; entropy of the predicted-class histogram in "
    "bits, 3.32 when all ten are equally common). latent: leave-one-out 5-nearest-neighbour class "
    "accuracy on test codes (VAE: posterior means); aggregate_codes: test codes (VAE: z sampled "
    "from q(z|x)) per-dimension mean and std, and the KL from a Gaussian fitted to them to "
    "N(0, I). posterior: active units (Cov over the test set of the posterior mean > 0.01) and KL "
    "per dimension. interpolation: the straight line between the codes of the same random pairs "
    "of test images (VAE: posterior means), decoded at 'steps' points: the Frechet distance of "
    "the decoded midpoints to the test set (standard_error: of 50 bootstrap resamples), the "
    "share of in-between frames classified with confidence > 0.9, evenness (a path's largest "
    "step in pixel space over its length, minus 1/(steps - 1): 0 for an even walk; after "
    "Berthelot et al. 2018) and, for pairs of two classes, the share of paths whose predicted "
    "class changes more than once; means over pairs with their standard errors."
    "sharpness (of each sampler's samples and of the reconstructions): the mean "
    "squared Laplacian (3x3 kernel [[0,1,0],[1,-4,1],[0,1,0]], over the 26x26 interior) of the "
    "decoded images divided by that of the real test images, 1.0 = as sharp as real digits. "
    "flags: the training objective's weights too (perceptual_weight, adversarial_weight, "
    "adversarial_start); with any above 0 the training loss is not the ELBO, but the test losses "
    "and test_nll_iwae above stay the likelihood's (bce, kl) alone."
)

CONDITIONAL_NOTES = (  # added to the notes of a run with --condition label
    " A conditional run (config condition 'label'): each model is given the test image's label "
    "(losses, codes, reconstructions, the GIF's codes), so knn5_accuracy measures how much of the "
    "class the code carries beside the label; samples are asked for labels drawn uniformly "
    "(seed 1), and asked_for_share is the share the classifier calls the label asked for, over "
    "all and per label; test_nll_iwae is -log p(x) = -log (1/10) sum_y p(x | y), each p(x | y) "
    "an importance-weighted estimate with that many samples (the same noise for each label), "
    "and test_nll_given_label_iwae is -log p(x | y) with the image's own label; "
    "label_from_likelihoods is the VAE as a classifier by Bayes' rule from those ten bounds, "
    "p(y | x) = p(x | y) / sum_y' p(x | y'): the share of test images whose most probable label "
    "is theirs, and the mean probability of their label; interpolation slides the label from "
    "one end's to the other's with the code."
)

LAPLACIAN = [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]


def laplacian_energy(images):
    """(N, 784) images -> (N,): the mean squared Laplacian over the 26x26 interior (no padding,
    so that the border adds no edges)."""
    kernel = torch.tensor(LAPLACIAN, dtype=torch.float32, device=images.device).reshape(1, 1, 3, 3)
    laplacian = F.conv2d(images.float().reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE), kernel)
    return laplacian.pow(2).mean(dim=(1, 2, 3))


def sharpness(images, real_images):
    """Mean squared Laplacian of `images` over that of `real_images` (N, 784): 1.0 = as sharp.
    real_images may be given as laplacian_energy(real_images).mean(), to reuse it."""
    reference = real_images if real_images.ndim == 0 else laplacian_energy(real_images).mean()
    return (laplacian_energy(images).mean() / reference).item()


@torch.inference_mode()
def evaluate_loss(model, images, labels=None, *, seed=0, batch_size=2000):
    """Mean loss parts per image (nats) over `images` (N, 784) and their sum as "loss": the VAE's
    negative ELBO with one z per image, drawn on the CPU from a generator seeded with `seed` (so
    the same weights always score the same, on every device), the AE's BCE. labels (N,): what a
    conditional model is given."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    parts = [model.terms(batch, batch_labels, generator=generator)[1]  # the ELBO, however trained
             for batch, batch_labels in batches_of(images, labels, batch_size)]
    values = torch.stack([torch.stack(list(part.values())) for part in parts]).tolist()  # one wait
    totals = {}
    for batch, part, row in zip(batches(images, batch_size), parts, values):
        for name, value in zip(part, row):
            totals[name] = totals.get(name, 0.0) + value * len(batch)
    means = {name: total / len(images) for name, total in totals.items()}
    return {"loss": sum(means.values()), **means}


def batches(images, batch_size):
    """`images` `batch_size` rows at a time (batches_of without labels)."""
    return (batch for batch, _ in batches_of(images, None, batch_size))


def batches_of(images, labels, batch_size):
    """(images, labels) `batch_size` rows at a time; labels on the images' device, or None."""
    labels = None if labels is None else labels.to(images.device)
    return ((images[start:start + batch_size],
             None if labels is None else labels[start:start + batch_size])
            for start in range(0, len(images), batch_size))


@torch.inference_mode()
def codes_of(model, images, labels=None, batch_size=2000):
    """(N, 784) -> the codes (N, D) model.encode gives: the VAE's are its posterior means."""
    model.eval()
    return torch.cat([model.encode(batch, batch_labels)
                      for batch, batch_labels in batches_of(images, labels, batch_size)])


@torch.inference_mode()
def posteriors_of(vae, images, labels=None, batch_size=2000):
    """(N, 784) -> the VAE's posterior q(z | x) of each image: mu and logvar, (N, D) each."""
    vae.eval()
    means, logvars = zip(*(vae.posterior(batch, batch_labels)
                           for batch, batch_labels in batches_of(images, labels, batch_size)))
    return torch.cat(means), torch.cat(logvars)


def sample_codes(mu, logvar, seed=0):
    """One z ~ q(z|x) = N(mu, exp(logvar)) per image (N, D): a sample of the aggregate posterior."""
    return reparameterize(mu, logvar, torch.Generator().manual_seed(seed))  # drawn on the CPU


@torch.inference_mode()
def decode_images(model, z, labels=None):
    """(N, latent_dim) -> (N, 1, 28, 28) images in [0, 1] (Bernoulli means)."""
    model.eval()
    return torch.sigmoid(model.decode(z, labels)).reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)


@torch.inference_mode()
def reconstruction_errors(model, codes, images, targets, labels=None, batch_size=2000):
    """Decode `codes` (N, D) of `images` (N, 784) and compare: BCE against the model's targets
    (nats per image); MSE per pixel, PSNR (dB, peak 1) and SSIM against the grey images."""
    model.eval()
    scores = {"bce": [], "mse": [], "psnr": []}
    windows, decoded = [], []
    for start, (batch, batch_labels) in zip(range(0, len(images), batch_size),
                                             batches_of(images, labels, batch_size)):
        logits = model.decode(codes[start:start + batch_size], batch_labels)  # (B, 784)
        reconstruction = torch.sigmoid(logits)  # Bernoulli means, in [0, 1]
        scores["bce"].append(bernoulli_nll_per_image(logits, targets[start:start + batch_size]))
        squared_error = (reconstruction - batch).pow(2).mean(dim=1)  # (B,)
        scores["mse"].append(squared_error)
        scores["psnr"].append(-10 * torch.log10(squared_error.clamp(min=1e-10)))
        windows.append(ssim_windows(reconstruction, batch))
        decoded.append(reconstruction)
    scores["ssim"] = [ssim_index(torch.cat(windows, dim=1))]
    return {**{name: torch.cat(values).mean().item() for name, values in scores.items()},
            "sharpness": sharpness(torch.cat(decoded), images)}


def ssim(images_a, images_b):
    """Structural similarity (Wang et al. 2004) of pairs of images in [0, 1], (N, 784) -> (N,):
    local means, variances and covariance under an 11x11 Gaussian window (sigma 1.5),
    C1 = 0.01^2, C2 = 0.03^2, averaged over the 18x18 window positions inside the image."""
    return ssim_index(ssim_windows(images_a, images_b))


def ssim_windows(images_a, images_b, *, window=11, sigma=1.5):
    """SSIM's local means of a, b, a^2, b^2 and ab under the Gaussian window, in float32 where
    the images are: (5, N, 18, 18)."""
    a, b = (images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE).float() for images in (images_a, images_b))
    taps = torch.exp(-(torch.arange(window, device=a.device) - window // 2) ** 2 / (2 * sigma**2))
    positions = IMAGE_SIDE - window + 1
    band = torch.zeros(IMAGE_SIDE, positions, device=a.device)  # column k: the window at k
    for k in range(positions):
        band[k:k + window, k] = taps / taps.sum()
    # the window is separable: band.T @ map @ band filters the columns, then the rows (8x faster
    # than conv2d on a CPU)
    return band.T @ torch.stack([a, b, a * a, b * b, a * b]) @ band  # (5, N, 18, 18)


def ssim_index(local):
    """Each image's SSIM (N,) from its ssim_windows: E[a^2] - E[a]^2 cancels most of its digits,
    so in float64, on the CPU (which every device has)."""
    mean_a, mean_b, mean_aa, mean_bb, mean_ab = local.cpu().double()
    var_a, var_b, covariance = mean_aa - mean_a**2, mean_bb - mean_b**2, mean_ab - mean_a * mean_b
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mean_a * mean_b + c1) * (2 * covariance + c2)
             / ((mean_a**2 + mean_b**2 + c1) * (var_a + var_b + c2)))  # (N, 18, 18)
    return index.mean(dim=(1, 2)).float()


IWAE_BATCH = 10  # images a batch of the IWAE bound: its noise is drawn in this order everywhere


@torch.inference_mode()
def iwae_nll(model, images, num_samples, labels=None, *, seed=0, batch_size=IWAE_BATCH,
             chunk_size=100, progress=False, per_call=None):
    """The importance-weighted estimate of -log p(x) per image (nats), mean over `images` (Burda
    et al. 2015): -log (1/K) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z | x); a conditional model's
    -log p(x | y), given the labels (N,). An upper bound on the NLL that tightens as K grows;
    K = 1 is the negative ELBO. The noise is drawn on the CPU, `batch_size` images and
    `chunk_size` samples at a time, in the same order on every device; a CPU decodes one such
    batch a call (1,000 rows stay in its caches: 2x faster than 5,000), a GPU up to 20,000 rows
    at once (per_call batches; None: by the device); the weights are summed with a running
    logsumexp in float64 on the CPU, one block of batches at a time, so memory stays bounded
    whatever K is."""
    total, steps = 0.0, math.ceil(len(images) / batch_size)
    with iwae_progress(steps, f"IWAE bound, {num_samples} samples", progress) as bar:
        for log_mean in iwae_log_means(model, images, num_samples, labels, bar, seed=seed,
                                       batch_size=batch_size, chunk_size=chunk_size,
                                       per_call=per_call):
            total += -log_mean.sum().item()
    return total / len(images)


@torch.inference_mode()
def iwae_log_likelihoods_per_label(model, images, num_samples, *, seed=0, progress=False,
                                   per_call=None):
    """(10, N) float64 on the CPU: the IWAE bound on log p(x | y) of every image for every label
    y, with `num_samples` samples and the same noise for every label (as iwae_nll draws it). A
    conditional model's -log p(x), comparable with an unconditional VAE's bound, is
    nll_over_labels of it; its classifier, label_from_likelihoods."""
    log_means, steps = [], NUM_CLASSES * math.ceil(len(images) / IWAE_BATCH)
    with iwae_progress(steps, f"IWAE bound, {num_samples} samples a label", progress) as bar:
        for label in range(NUM_CLASSES):
            labels = torch.full((len(images),), label)
            log_means.append(torch.cat(list(iwae_log_means(
                model, images, num_samples, labels, bar, seed=seed, per_call=per_call))))
    return torch.stack(log_means)


def nll_over_labels(log_likelihoods):
    """-log p(x) = -log (1/10) sum_y p(x | y), mean over the images, from (10, N) log p(x | y)."""
    return -(torch.logsumexp(log_likelihoods, dim=0) - math.log(NUM_CLASSES)).mean().item()


def label_from_likelihoods(log_likelihoods, labels):
    """The conditional VAE as a classifier, by Bayes' rule: p(y | x) = p(x | y) p(y) / p(x), with
    p(y) = 1/10, from the (10, N) bounds on log p(x | y). The share of images whose most probable
    label is theirs, and the mean probability it gives their label."""
    posterior = torch.softmax(log_likelihoods, dim=0)  # (10, N): p(y | x)
    labels = labels.cpu()
    return {"accuracy": (posterior.argmax(dim=0) == labels).float().mean().item(),
            "mean_probability_of_the_true_label":
                posterior[labels, torch.arange(len(labels))].mean().item()}


def iwae_progress(steps, description, shown):
    """The IWAE bound's progress bar, a step a batch (in terminals, where `shown`)."""
    return tqdm(total=steps, desc=description, leave=False, disable=None if shown else True)


def iwae_log_means(model, images, num_samples, labels, bar, *, seed, batch_size=IWAE_BATCH,
                   chunk_size=100, per_call=None):
    """Each batch's log (1/K) sum_k w_k per image (B,), float64 on the CPU, batch after batch."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    if per_call is None:
        per_call = 1 if images.device.type == "cpu" else max(1, min(  # rows a decoder call, noise
            20_000 // (batch_size * min(chunk_size, num_samples)),
            2**24 // (batch_size * num_samples * model.latent_dim)))
    for block, block_labels in batches_of(images, labels, batch_size * per_call):
        sizes = [len(batch) for batch in batches(block, batch_size)]
        eps = [[torch.randn(min(chunk_size, num_samples - drawn), size, model.latent_dim,
                            generator=generator) for drawn in range(0, num_samples, chunk_size)]
               for size in sizes]  # [batch][chunk]: (count, B, D), as a batch at a time draws
        log_weights = torch.cat([model.log_importance_weights(
            block, len(chunk[0]), labels=block_labels, eps=torch.cat(chunk, dim=1))
            for chunk in zip(*eps)]).cpu()  # (K, block)
        for first, size in zip(itertools.accumulate([0, *sizes]), sizes):
            yield batch_log_mean(log_weights[:, first:first + size], num_samples, chunk_size)
        bar.update(len(sizes))


def batch_log_mean(log_weights, num_samples, chunk_size):
    """log (1/K) sum_k w_k per image (B,) from a batch's log weights (K, B), in float64, chunk by
    chunk with a running logsumexp."""
    log_sum = torch.full((log_weights.shape[1],), -math.inf, dtype=torch.float64)
    for drawn in range(0, num_samples, chunk_size):
        chunk = log_weights[drawn:drawn + chunk_size].cpu().contiguous().double()  # (count, B)
        log_sum = torch.logaddexp(log_sum, torch.logsumexp(chunk, dim=0))
    return log_sum - math.log(num_samples)


def posterior_statistics(mu, logvar):
    """The VAE's posteriors of a set of images, each (N, D): its active units (dimensions whose
    posterior mean varies over the images: Cov > 0.01, Burda et al. 2015) and the mean KL to
    N(0, I) of each dimension (nats)."""
    activity = mu.var(dim=0)  # (D,)
    return {"active_units": int((activity > 0.01).sum()),
            "posterior_mean_variance": activity.tolist(),
            "kl_per_dimension": kl_per_dimension(mu, logvar).mean(dim=0).tolist()}


def gaussian_kl_to_standard(codes):
    """KL( N(m, S) || N(0, I) ) for the Gaussian fitted to `codes` (N, D) (S with
    models.fitted_covariance's ridge, so that a collapsed dimension stays finite):
    0.5 (tr S + m.m - D - log det S)."""
    mean, covariance = code_moments(codes)
    log_det = torch.linalg.slogdet(covariance)[1]
    return 0.5 * (torch.trace(covariance) + mean @ mean - codes.shape[1] - log_det).item()


def code_statistics(codes):
    """How far the aggregate codes (N, D) are from N(0, I): per-dimension mean and std, and the
    KL above."""
    return {"mean": codes.mean(dim=0).tolist(), "std": codes.std(dim=0).tolist(),
            "gaussian_kl_to_prior": gaussian_kl_to_standard(codes)}


def knn_accuracy(codes, labels, k=5, batch_size=500):
    """Leave-one-out k-nearest-neighbour accuracy of `labels` (N,) from `codes` (N, D):
    Euclidean, majority vote (ties go to the smaller label). 500 rows of distances at a time: 1.6x
    faster than 1,000 on a CPU."""
    codes, labels = codes.float(), labels.to(codes.device)
    correct, classes = 0, int(labels.max()) + 1  # correct: summed on the device, read at the end
    for start in range(0, len(codes), batch_size):
        distances = torch.cdist(codes[start:start + batch_size], codes)  # (b, N)
        rows = torch.arange(len(distances), device=codes.device)
        distances[rows, start + rows] = math.inf  # not its own neighbour
        neighbours = labels[distances.topk(k, largest=False).indices]  # (b, k)
        votes = torch.zeros(len(neighbours), classes, device=codes.device)
        votes.scatter_add_(1, neighbours, torch.ones_like(neighbours, dtype=votes.dtype))
        correct = correct + (votes.argmax(dim=1) == labels[start:start + batch_size]).sum()
    return int(correct) / len(codes)


def frechet_distance(features_a, features_b):
    """||m_a - m_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two
    feature sets (N, F): the FID's formula (Heusel et al. 2017), on our small classifier's
    features. Either set may be given as its feature_moments, to reuse them."""
    (mean_a, cov_a), (mean_b, cov_b) = (
        features if isinstance(features, tuple) else feature_moments(features)
        for features in (features_a, features_b))
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_a)
    sqrt_a = eigenvectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T
    # tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), whose argument is symmetric PSD
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return ((mean_a - mean_b).pow(2).sum() + torch.trace(cov_a + cov_b) - 2 * cross).item()


def feature_moments(features):
    """The mean (F,) and covariance (F, F) of a feature set (N, F), in float64 on the CPU."""
    features = features.detach().cpu().double()
    return features.mean(dim=0), torch.cov(features.T)


def histogram_entropy(predicted, num_classes=10):
    """Entropy (bits) of the histogram of predicted classes: log2(10) = 3.32 when all ten are
    equally common."""
    counts = torch.bincount(predicted.cpu(), minlength=num_classes).double()
    shares = counts[counts > 0] / counts.sum()
    return -(shares * shares.log2()).sum().item() + 0.0  # + 0.0: one class gives 0.0, not -0.0


@torch.inference_mode()
def classify(classifier, images, batch_size=250):
    """(N, 784) -> features (N, 128) and class probabilities (N, 10). 250 images a batch keep the
    CNN's feature maps in a CPU's caches (6x faster than 2,000, with channels-last weights)."""
    classifier.eval()
    features = torch.cat([classifier.features(batch) for batch in batches(images, batch_size)])
    return features, torch.softmax(classifier.head(features), dim=1)


def sample_quality(classifier, samples, reference_features):
    """Scores of decoded samples (N, 784): the Frechet distance of the classifier's features to
    the test set's, the share classified with confidence above 0.9, and the entropy (bits) of
    the histogram of predicted classes."""
    features, probabilities = classify(classifier, samples)
    confidence, predicted = probabilities.max(dim=1)
    return {"frechet_distance": frechet_distance(features, reference_features),
            "confident_share": (confidence > 0.9).float().mean().item(),
            "class_entropy_bits": histogram_entropy(predicted)}


def train_classifier(train_images, train_labels, test_images, test_labels, *, epochs=3,
                     batch_size=128, seed=0, network=None,
                     description="scoring classifier"):
    """Train the scoring CNN (or another `network` class) on the grey training images, with a
    progress bar; return it and its test accuracy."""
    network = network or DigitClassifier
    torch.manual_seed(seed)
    device = train_images.device
    classifier = network().to(device)
    optimizer = utils.make_optimizer(classifier, 1e-3, device)
    shuffle = torch.Generator().manual_seed(seed)  # the same order on every device
    train_labels = train_labels.to(device)
    classifier.train()
    steps = epochs * math.ceil(len(train_images) / batch_size)
    with tqdm(total=steps, desc=description, leave=False, disable=None) as progress:
        for _ in range(epochs):
            order = torch.randperm(len(train_images), generator=shuffle).to(device)
            for indices in batches(order, batch_size):
                loss = F.cross_entropy(classifier(train_images[indices]), train_labels[indices])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress.update()
    classifier.eval()
    with torch.inference_mode():
        logits = torch.cat([classifier(batch) for batch in batches(test_images, 250)])
    accuracy = (logits.argmax(dim=1).cpu() == test_labels.cpu()).float().mean().item()
    return classifier, accuracy


def load_classifier(path, device, dataset="mnist", network=None):
    """The cached scoring classifier (or `network`) of `dataset` at `path`, and its test
    accuracy, each checked as data: the weights of this classifier, finite, trained on that
    dataset."""
    checkpoint = checkpoint_files.load_checkpoint(path, fix="delete it and it is retrained")
    classifier = (network or DigitClassifier)()
    accuracy, trained_on = checkpoint.get("test_accuracy"), checkpoint.get("dataset", dataset)
    problem = checkpoint_files.state_dict_problem(checkpoint["model"], classifier.state_dict())
    if not (checkpoint_files.is_finite_number(accuracy) and 0 <= accuracy <= 1):
        problem = f"its test accuracy is {checkpoint_files.brief(accuracy)}"
    if trained_on != dataset:  # caches written before the field was stored are taken as named
        problem = f"it was trained on {checkpoint_files.brief(trained_on)}, not {dataset}"
    if problem:
        raise utils.ProjectError(f"{path} does not hold this project's {dataset} classifier "
                                 f"({problem}); delete it and it is retrained")
    classifier.load_state_dict(checkpoint["model"])
    return classifier.to(device), accuracy


def save_classifier(path, classifier, accuracy, dataset, kind="classifier"):
    checkpoint_files.save_checkpoint(path, {"config": {"kind": kind}, "dataset": dataset,
                                 "model": classifier.state_dict(), "history": [],
                                 "test_accuracy": accuracy})


def scoring_classifier(dataset, data, phases):
    """The CNN that scores samples: trained once per dataset and cached in CLASSIFIER_DIR."""
    path = classifier_path(dataset)
    if path.exists():
        return load_classifier(path, data["train"][0].device, dataset)
    device = data["train"][0].device
    print(f"training the classifier that scores samples (once for {utils.DATASETS[dataset].title};"
          f" cached in {path}) ...")
    if device.type != "cpu":  # the same seed trains other weights on a GPU: other sample scores
        print(f"note: trained on {device}, the classifier's weights differ from a CPU's, and so do "
              "the sample scores it gives; to compare with the published numbers, keep the "
              "committed checkpoints/classifier-mnist.pt")
    with phases("training the scoring classifier"):
        classifier, accuracy = train_classifier(*data["train"], *data["test"])
    save_classifier(path, classifier, accuracy, dataset)
    print(f"scoring classifier: {100 * accuracy:.2f}% test accuracy")
    return classifier, accuracy


def classifier_path(dataset):
    return CLASSIFIER_DIR / f"classifier-{dataset}.pt"


PERCEPTUAL_SEED = 1  # not the scoring classifier's 0: another network, other weights


def perceptual_network(dataset, data, phases):
    """The frozen CNN of --perceptual-weight (models.PerceptualNet): trained once per dataset on
    its labels, as the scoring classifier is, and cached in CLASSIFIER_DIR beside it."""
    path = CLASSIFIER_DIR / f"perceptual-{dataset}.pt"
    if path.exists():
        return load_classifier(path, data["train"][0].device, dataset, PerceptualNet)[0]
    print(f"training the perceptual loss's CNN (once for {utils.DATASETS[dataset].title}; cached "
          f"in {path}) ...")
    with phases("training the perceptual network"):
        network, accuracy = train_classifier(*data["train"], *data["test"], seed=PERCEPTUAL_SEED,
                                             network=PerceptualNet, description="perceptual CNN")
    save_classifier(path, network, accuracy, dataset, kind="perceptual")
    print(f"perceptual network: {100 * accuracy:.2f}% test accuracy")
    return network


def score_model(model, binarize, data, phases):
    """One model's losses, reconstructions and latent statistics, on the targets its --binarize
    asks for; returns them with its test codes (VAE: posterior means), which the figures reuse.
    A conditional model is given each image's label."""
    (train_images, train_labels), (test_images, test_labels) = data["train"], data["test"]
    test_targets = utils.binarized(test_images, binarize, "test")
    with phases("scoring the losses"):
        # the training set is scored on one fixed binarization when training resampled it
        train_targets = utils.binarized(train_images, "static" if binarize == "dynamic"
                                        else binarize, "train")
        scores = {"test": evaluate_loss(model, test_targets, test_labels),
                  "train": evaluate_loss(model, train_targets, train_labels)}
    with phases("scoring codes and reconstructions"):
        if isinstance(model, VAE):  # its codes: the posterior means
            codes, logvar = posteriors_of(model, test_images, test_labels)  # (N, D) each
        else:
            codes, logvar = codes_of(model, test_images, test_labels), None
        scores["reconstruction"] = reconstruction_errors(model, codes, test_images, test_targets,
                                                         test_labels)
        aggregate = codes if logvar is None else sample_codes(codes, logvar)  # z ~ q(z|x)
        scores["latent"] = {"knn5_accuracy": knn_accuracy(codes, test_labels),
                            "aggregate_codes": code_statistics(aggregate)}
        if logvar is not None:
            scores["posterior"] = posterior_statistics(codes, logvar)
    return scores, codes


def make_samplers(models, train):
    """{label: (model, models.LatentGaussian)}: each model decodes z ~ N(0, I), the VAE's prior;
    the AE also decodes z from a Gaussian fitted to its own training codes, its fair chance.
    train: the training images and labels."""
    samplers = {f"{name}, z ~ N(0, I)": (model, LatentGaussian.standard(model.latent_dim))
                for name, model in models.items()}
    if "AE" in models:
        codes = codes_of(models["AE"], *train)
        require_finite(codes, "the AE's codes of the training set")
        fitted = LatentGaussian.fitted(codes)
        samplers["AE, z ~ Gaussian fitted to its training codes"] = (models["AE"], fitted)
    return samplers


def draw_samples(model, prior, count, seed=0):
    """`count` images (count, 784) that `model` generates from `prior`, drawn from `seed`: the
    same draws for every model of a latent size, on every device; a conditional model is asked
    for asked_labels(count)."""
    return model.sample(count, asked_labels(count) if model.label_dim else None, prior=prior,
                        generator=torch.Generator().manual_seed(seed))


def asked_labels(count, seed=1):
    """The labels a conditional model's samples are asked for: (count,), drawn uniformly."""
    return torch.randint(NUM_CLASSES, (count,), generator=torch.Generator().manual_seed(seed))


def require_finite(values, what, where=""):
    """Stop in one line where finite weights still give NaN or infinite `values` (they overflow),
    before linear algebra or a figure chokes on them."""
    if not values.isfinite().all():
        raise utils.ProjectError(f"{what} are NaN or infinite (the model's weights overflow"
                                 f"{where}); retrain it with a lower --lr")


def score_samples(samplers, classifier, test_images, reference, count):
    """Frechet distance, confident share, class entropy and sharpness of `count` samples of each
    sampler; reference: the classifier's features of the test images."""
    scores, real_energy = {}, laplacian_energy(test_images).mean()
    for label, (model, prior) in samplers.items():
        samples = draw_samples(model, prior, count)
        require_finite(samples, f"the samples of {label}")
        scores[label] = {**sample_quality(classifier, samples, reference),
                         "sharpness": sharpness(samples, real_energy)}
        if model.label_dim:
            scores[label].update(asked_for_shares(classifier, samples, asked_labels(count)))
    return scores


def asked_for_shares(classifier, samples, asked):
    """A conditional model's samples (N, 784), each asked for a label (N,): the share the
    classifier calls the label asked for, over all and per label."""
    predicted = classify(classifier, samples)[1].argmax(dim=1).cpu()  # (N,)
    hits = (predicted == asked).cpu().double()
    return {"asked_for_share": hits.mean().item(), "asked_for_share_per_label": {
        str(label): hits[asked == label].mean().item() for label in range(NUM_CLASSES)}}


def interpolation_pairs(labels, count=1000, seed=0):
    """(count, 2) indices of distinct test images, the same for every model and every run; fewer
    pairs where the test set holds fewer than 2 * count images (an odd one left out)."""
    generator = torch.Generator().manual_seed(seed)
    count = min(count, len(labels) // 2)
    return torch.randperm(len(labels), generator=generator)[:2 * count].reshape(count, 2)


@torch.inference_mode()
def interpolation_quality(model, codes, labels, classifier, reference_features, pairs, *,
                          steps=16, seed=0):
    """How a model's straight latent paths between pairs of test codes decode (after Berthelot
    et al. 2018, ACAI): realism (the Frechet distance of the decoded midpoints to the test set,
    the share of in-between frames classified with confidence > 0.9), evenness (each path's
    largest step in pixel space over its length, minus 1/(steps - 1): 0 for an even walk) and
    the share of paths between digits of two classes whose predicted class changes more than
    once. Means with their standard errors; the Frechet distance with a bootstrap's. A
    conditional model's label slides from one end's to the other's with the code."""
    ends = codes[pairs.to(codes.device)]  # (P, 2, D)
    t = torch.linspace(0, 1, steps, device=codes.device)[None, :, None]  # (1, steps, 1)
    path = lerp(ends[:, :1], ends[:, 1:], t)  # (P, steps, D)
    path_labels = midpoint_labels = None
    if model.label_dim:
        end_labels = label_vectors(labels[pairs].flatten(), 2 * len(pairs), NUM_CLASSES, codes) \
            .reshape(len(pairs), 2, NUM_CLASSES)  # (P, 2, 10)
        path_labels = lerp(end_labels[:, :1], end_labels[:, 1:], t).flatten(0, 1)
        midpoint_labels = end_labels.mean(dim=1)
    frames = decode_images(model, path.flatten(0, 1), path_labels).flatten(1) \
        .reshape(len(pairs), steps, -1)
    step_sizes = (frames[:, 1:] - frames[:, :-1]).norm(dim=2)  # (P, steps - 1)
    evenness = step_sizes.max(dim=1).values / step_sizes.sum(dim=1).clamp(min=1e-12)
    _, probabilities = classify(classifier, frames.flatten(0, 1))
    confidence, predicted = probabilities.reshape(len(pairs), steps, -1).max(dim=2)
    changes = (predicted[:, 1:] != predicted[:, :-1]).sum(dim=1)  # (P,)
    two_classes = labels[pairs[:, 0]] != labels[pairs[:, 1]]
    midpoints = decode_images(model, ends.mean(dim=1), midpoint_labels).flatten(1)
    features, _ = classify(classifier, midpoints)
    return {
        "pairs": len(pairs), "steps": steps,
        "midpoint_frechet_distance": with_bootstrap(features, reference_features, seed=seed),
        "in_between_confident_share": mean_and_error((confidence[:, 1:-1] > 0.9).float().mean(1)),
        "evenness": mean_and_error(evenness - 1 / (steps - 1)),
        "class_changes_more_than_once": mean_and_error(
            (changes[two_classes.to(changes.device)] > 1).float()),
    }


def lerp(start, end, t):
    """The straight path (1 - t) start + t end, at t."""
    return (1 - t) * start + t * end


def mean_and_error(values):
    """{"mean", "standard_error"} of one value per pair (P,), in float64 on the CPU; with fewer
    than 2 values (a test set of a few images) what cannot be computed is None, and "skipped"
    says why."""
    values = values.detach().cpu().double()
    if len(values) < 2:
        return {"mean": values.mean().item() if len(values) else None, "standard_error": None,
                "skipped": f"{utils.counted(len(values), 'pair')}: too few for a spread"}
    return {"mean": values.mean().item(), "standard_error": (values.std() / len(values) ** 0.5)
            .item()}



def with_bootstrap(features, reference_features, *, resamples=50, seed=0):
    """The Frechet distance of `features` to the reference and its spread: the standard
    deviation over `resamples` bootstrap resamples of `features`."""
    generator, reference = torch.Generator().manual_seed(seed), feature_moments(reference_features)
    features = features.cpu()  # resampled with the CPU generator's indices
    draws = [frechet_distance(features[torch.randint(len(features), (len(features),),
                                                     generator=generator)], reference)
             for _ in range(resamples)]
    return {"mean": frechet_distance(features, reference),
            "standard_error": torch.tensor(draws, dtype=torch.float64).std().item()}


COMPARISON_COLUMNS = [  # (key, title, format) of each comparison_row
    ("test_loss", "test loss: -ELBO (AE: BCE)", "{:.2f}"),
    ("test_nll_iwae", "IWAE bound", "{:.2f}"),
    ("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"),
    ("frechet_distance", "samples: Frechet distance", "{:.1f}"),
    ("confident_share", "confident", "{:.1%}"),
    ("sample_sharpness", "sharpness: samples", "{:.2f}"),
    ("reconstruction_sharpness", "reconstructions", "{:.2f}"),
    ("seconds_per_epoch", "s/epoch", "{:.1f}"), ("epochs", "epochs", "{}")]


def comparison_row(scores, kind, path, fix):
    """The numbers --compare tabulates for one model, from its run's metrics.json (`scores`, read
    from `path`): its likelihood (the test losses stay the ELBO's whatever it trained on),
    reconstructions, prior samples and speed. Each checked as data: a number the file lacks that
    came later to the project (sharpness) is left out, one that is not a number is one line
    ending with `fix`."""
    sampler = f"{kind.upper()}, z ~ N(0, I)"
    fields = {"test_loss": (kind, "test", "loss"), "test_nll_iwae": (kind, "test_nll_iwae", "nats"),
              "psnr": (kind, "reconstruction", "psnr"), "ssim": (kind, "reconstruction", "ssim"),
              "frechet_distance": ("samples", sampler, "frechet_distance"),
              "confident_share": ("samples", sampler, "confident_share"),
              "sample_sharpness": ("samples", sampler, "sharpness"),
              "reconstruction_sharpness": (kind, "reconstruction", "sharpness"),
              "seconds_per_epoch": (kind, "seconds_per_epoch"), "epochs": (kind, "epochs")}
    optional = {"sample_sharpness", "reconstruction_sharpness"}  # older files lack them
    optional |= {"test_nll_iwae"} if kind == "ae" else set()
    row = {column: read_field(scores, keys, (int, float), path, fix, column in optional)
           for column, keys in fields.items()}
    row["arch"] = read_field(scores, (kind, "config", "arch"), str, path, fix)
    row["flags"] = read_field(scores, (kind, "flags"), dict, path, fix)
    return {key: value for key, value in row.items() if value is not None}


def comparison_basis(scores, kind, path, fix):
    """What must be the same for two runs' numbers to compare: the dataset, the targets
    (--binarize), whether the models are given the label (their losses are then -log p(x | y)),
    the samples each sample score counts and the IWAE bound's samples (VAE)."""
    return {"dataset": read_field(scores, ("dataset",), str, path, fix),
            "--condition": read_field(scores, (kind, "config", "condition"), str, path, fix,
                                      optional=True) or "none",  # older files: unconditional
            "--binarize": read_field(scores, (kind, "binarize"), str, path, fix),
            "--quality-samples": read_field(scores, ("quality_samples",), int, path, fix),
            "--nll-samples": read_field(scores, (kind, "test_nll_iwae", "samples"), int, path, fix,
                                        optional=kind == "ae")}


def read_field(scores, keys, kind, path, fix, optional=False):
    """scores[keys[0]][keys[1]]... read from the JSON file `path`, checked to be of type `kind`
    (a number finite, not a bool); None where it is absent and `optional`, else one line."""
    value = scores
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    if value is None and optional:
        return None
    numbers = kind in (int, (int, float))
    if not isinstance(value, kind) or (numbers and not checkpoint_files.is_finite_number(value)):
        raise utils.ProjectError(f"{path}: its {'.'.join(keys)} is {checkpoint_files.brief(value)}"
                                 f", not {'a number' if numbers else 'a ' + kind.__name__}; {fix}")
    return value


def comparison_table(table):
    """{label: comparison_row} -> a Markdown table, a row per model."""
    lines = ["| run | " + " | ".join(title for _, title, _ in COMPARISON_COLUMNS) + " |",
             "|---|" + "---|" * len(COMPARISON_COLUMNS)]
    for label, row in table.items():
        cells = [form.format(row[key]) if key in row else "-"
                 for key, _, form in COMPARISON_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


STUDY_COLUMNS = [("mse", "MSE per pixel"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"),
                 ("test_loss", "test loss (nats)"), ("test_nll_iwae", "IWAE NLL (nats)")]


def latent_study_table(study):
    """study: {"2": {"vae": {...}, "ae": {...}}, ...} -> a Markdown table, a row per size and
    model."""
    lines = ["| latent size | model | " + " | ".join(title for _, title in STUDY_COLUMNS) + " |",
             "|---|---|" + "---|" * len(STUDY_COLUMNS)]
    for size, row in study.items():
        for kind, values in row.items():
            cells = ["-" if key not in values else f"{values[key]:.4f}" if key in ("mse", "ssim")
                     else f"{values[key]:.2f}" for key, _ in STUDY_COLUMNS]
            lines.append(f"| {size} | {kind.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_row(metrics):
    """The numbers the latent-size study compares, for each model of one run."""
    row = {}
    for kind in ("vae", "ae"):
        if kind in metrics:
            row[kind] = {**metrics[kind]["reconstruction"],
                         "test_loss": metrics[kind]["test"]["loss"]}
            if "test_nll_iwae" in metrics[kind]:
                row[kind]["test_nll_iwae"] = metrics[kind]["test_nll_iwae"]["nats"]
    return row


# ------------------------------------------------------------------ the scoring classifier

class DigitClassifier(nn.Module):
    """A small CNN that only scores samples (Frechet distance, confidence, class coverage), never
    trains the VAE or AE. (B, 784) -> (B, 10) logits; features() gives the 128-D layer before.
    Each block pools before its ReLU: the same values (max and ReLU commute), 4x fewer ReLUs."""

    def __init__(self, *, num_classes=10, feature_dim=128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),  # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),  # (B, 32, 7, 7)
            nn.Flatten(), nn.Linear(32 * 7 * 7, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.to(memory_format=torch.channels_last)  # a CPU pools channels-last maps 4x faster

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))
