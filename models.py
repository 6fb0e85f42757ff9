"""The models and their losses, pure: a plain autoencoder (AE) and a variational autoencoder (VAE).
No files, no devices, no training loop and no scores here (metrics.py scores them).

Both autoencoders share one encoder/decoder shape (an MLP, a small convnet with --arch conv, or
residual blocks with attention with --arch resnet) and compute their own loss, so that main.py's
training loop treats them alike: `loss, parts = model(x)`.
Images are flattened to 784 pixels in [0, 1]. Read the AE, then the VAE: what it adds is
`posterior`, `reparameterize`, the KL term and `log_importance_weights`, and with objective
"iwae" (--objective iwae) a training loss from those weights: the IWAE bound. With condition "label"
(--condition label) both are conditional: the encoder sees the image and its label, the decoder
the code and the label, each as a one-hot vector beside its input. After them, the extra
training terms that make decodes sharper (TrainingObjective): a perceptual distance in a small
frozen CNN's features (PerceptualNet) and a PatchGAN discriminator's hinge loss (Discriminator).
"""
import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

MODEL_NAMES = {"vae": "VAE", "ae": "AE"}  # a model's kind (its checkpoint's file name) and its name
ARCHITECTURES = ["mlp", "conv", "resnet"]
CONDITIONS = ["none", "label"]
OBJECTIVES = ["elbo", "iwae"]
NUM_CLASSES = 10  # the labels of MNIST and Fashion-MNIST


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in its checkpoint."""
    kind: str  # "vae" or "ae"
    latent_dim: int = 20
    hidden_dim: int = 400
    image_dim: int = 784  # 28 * 28 pixels, flattened
    arch: str = "mlp"  # "mlp", "conv" or "resnet" (there hidden_dim: the linear layer to/from z)
    hidden_layers: int = 1  # MLP hidden layers in the encoder and in the decoder
    beta: float = 1.0  # weight of the KL term in the VAE's training loss (1: the ELBO)
    condition: str = "none"  # "label": encoder and decoder also see the image's label
    objective: str = "elbo"  # the VAE's training loss: "elbo", or "iwae", the IWAE bound with k
    k: int = 1  # importance samples per image of the "iwae" objective (1: the ELBO itself)


class Autoencoder(nn.Module):
    """A deterministic AE: x -> z = encoder(x) -> decoder(z) = pixel logits. Its loss: the
    Bernoulli NLL of x. labels, where a method takes them: the images' classes (B,) or one class
    for all, or (B, 10) mixes of one-hot labels; an unconditional model takes none (sample and
    reconstruct, the API, refuse what does not fit with a ValueError before any work)."""

    def __init__(self, *, latent_dim=20, hidden_dim=400, image_dim=784, arch="mlp",
                 hidden_layers=1, beta=1.0, condition="none", objective="elbo", k=1):
        super().__init__()
        self.latent_dim, self.beta, self.image_dim = latent_dim, beta, image_dim
        self.objective, self.k = objective, k  # the VAE's training loss; the AE has only the BCE
        self.label_dim = NUM_CLASSES if condition == "label" else 0  # one-hot columns it takes
        outputs, labels = self.encoder_outputs(latent_dim), self.label_dim
        if arch in ("conv", "resnet"):
            assert image_dim == 784, f"the {arch} architecture is built for 28x28 images"
            encoder, decoder = (conv_encoder, conv_decoder) if arch == "conv" else \
                (resnet_encoder, resnet_decoder)
            self.encoder = encoder(hidden_dim, outputs, labels)
            self.decoder = decoder(latent_dim, hidden_dim, labels)
        else:
            self.encoder = mlp(image_dim + labels, hidden_dim, outputs, hidden_layers)  # [x, y]
            self.decoder = mlp(latent_dim + labels, hidden_dim, image_dim, hidden_layers)  # [z, y]

    @staticmethod
    def encoder_outputs(latent_dim):
        return latent_dim

    def with_label(self, x, labels):
        """(B, F) -> [x, one_hot(y)] (B, F + 10) for a conditional model; x itself otherwise."""
        if not self.label_dim:
            return x
        if labels is None:
            raise ValueError("this model is conditional: give it labels (a class, or one each)")
        return torch.cat([x, label_vectors(labels, len(x), self.label_dim, x)], dim=1)

    def encode(self, x, labels=None):
        """(B, 784) -> (B, latent_dim) code; for the VAE, the posterior mean."""
        return self.encoder(self.with_label(x, labels))

    def decode(self, z, labels=None):
        """(B, latent_dim) -> (B, 784) pixel logits; sigmoid gives the image."""
        return self.decoder(self.with_label(z, labels))

    def forward(self, x, labels=None, kl_weight=1.0, generator=None):
        """x: (B, 784) -> (loss, parts): the loss per image in nats, averaged over the batch.
        kl_weight and generator (the VAE's torch.Generator for z) are accepted so that the training
        loop treats both models alike: the AE has no KL term and draws nothing."""
        return self.terms(x, labels, kl_weight, generator)[:2]

    def terms(self, x, labels=None, kl_weight=1.0, generator=None):
        """forward's (loss, parts) and the decoded pixel logits (B, 784) they came from."""
        logits = self.decode(self.encode(x, labels), labels)
        reconstruction = bernoulli_nll(logits, x)
        return reconstruction, {"bce": reconstruction.detach()}, logits

    def checked_labels(self, labels, count):
        """The API's labels, refused with a ValueError that says what is accepted: none for an
        unconditional model; for a conditional one a class 0-9, `count` of them, or (count, 10)
        mixes. Not in the training loop: reading a tensor's values waits for its device."""
        if not self.label_dim:
            if labels is not None:
                raise ValueError("labels: this model is unconditional (trained without "
                                 "--condition label) and cannot use them; leave labels out")
            return None
        if labels is None:
            raise ValueError("labels: this model is conditional: give a class 0-9, one per image, "
                             "or (count, 10) mixes of one-hot rows")
        try:
            labels = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"labels: give a class 0-9, one per image, or (count, 10) mixes; got "
                             f"{type(labels).__name__}") from None
        if labels.is_floating_point():
            if labels.shape not in ((NUM_CLASSES,), (count, NUM_CLASSES)):
                raise ValueError(f"labels: mixes must be (10,) or ({count}, 10), one per image; "
                                 f"got {tuple(labels.shape)}")
            return labels
        if labels.dtype == torch.bool or labels.shape not in ((), (1,), (count,)):
            raise ValueError(f"labels: give one class 0-9 or {count} of them (one per image); got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        outside = labels[(labels < 0) | (labels >= NUM_CLASSES)].unique().tolist()
        if outside:
            raise ValueError(f"labels: classes are 0-9; got {', '.join(map(str, outside[:3]))}")
        return labels

    @torch.inference_mode()
    def sample(self, count, labels=None, *, prior=None, generator=None):
        """Generate: decode `count` codes drawn from `prior` (a LatentGaussian; by default
        N(0, I), the VAE's prior) into images (count, 784) in [0, 1], the Bernoulli means; a
        conditional model as the `labels` asked for. The VAE was trained so that N(0, I) covers
        its codes; the AE was not, and most of its draws land where its decoder has never been.
        generator: a CPU torch.Generator, for the same draws on every device."""
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise ValueError(f"count: the number of images to sample, an int of at least 0; got "
                             f"{count!r}")
        labels = self.checked_labels(labels, count)
        self.eval()
        prior = prior or LatentGaussian.standard(self.latent_dim)
        z = prior.draw(count, generator).to(next(self.parameters()).device)  # (count, D)
        return torch.sigmoid(self.decode(z, labels))

    @torch.inference_mode()
    def reconstruct(self, x, labels=None):
        """Encode images (B, 784) in [0, 1], then decode their codes: (B, 784) in [0, 1]."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2 \
                or x.shape[1] != self.image_dim:
            what = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else \
                type(x).__name__
            raise ValueError(f"x: images as a float tensor (B, {self.image_dim}) in [0, 1] (for "
                             f"(B, 28, 28) use x.flatten(1), for uint8 x / 255); got {what}")
        labels = self.checked_labels(labels, len(x))
        self.eval()
        return torch.sigmoid(self.decode(self.encode(x, labels), labels))


class VAE(Autoencoder):
    """The encoder gives q(z|x) = N(mu, diag(sigma^2)); the loss is the negative ELBO,
    -E_q[log p(x|z)] + KL(q(z|x) || N(0, I)), with one sample of z per image; with objective
    "iwae", the negative IWAE bound with k samples of z per image."""

    @staticmethod
    def encoder_outputs(latent_dim):
        return 2 * latent_dim  # mu and log sigma^2

    def posterior(self, x, labels=None):
        """(B, 784) -> mu, logvar, each (B, latent_dim), in fp32 (the encoder may run in bf16)."""
        mu, logvar = self.encoder(self.with_label(x, labels)).float().chunk(2, dim=1)
        return mu, logvar

    def encode(self, x, labels=None):
        return self.posterior(x, labels)[0]

    def terms(self, x, labels=None, kl_weight=1.0, generator=None):
        """kl_weight in [0, 1] scales the KL weight beta during a warm-up; the parts are always
        unweighted, so bce + kl is the negative ELBO. generator: the torch.Generator that draws
        z."""
        mu, logvar = self.posterior(x, labels)
        z = reparameterize(mu, logvar, generator)  # sampled in eval mode too: the sampled test ELBO
        logits = self.decode(z, labels)
        reconstruction = bernoulli_nll(logits, x)
        kl = kl_to_standard_normal(mu, logvar)
        loss = reconstruction + (kl_weight * self.beta) * kl
        return loss, {"bce": reconstruction.detach(), "kl": kl.detach()}, logits

    def forward(self, x, labels=None, kl_weight=1.0, generator=None):
        """The training loss: the negative ELBO (terms), or with objective "iwae" and k > 1 the
        negative IWAE bound, -log (1/k) sum_k w_k, whose gradient weighs each z_k by its share of
        the k importance weights. k = 1 is the ELBO, with the KL in closed form as terms has it."""
        if self.objective != "iwae" or self.k == 1:
            return super().forward(x, labels, kl_weight, generator)
        log_weights = self.log_importance_weights(x, self.k, generator, labels=labels,
                                                  kl_weight=kl_weight * self.beta)  # (k, B)
        bound = torch.logsumexp(log_weights, dim=0) - math.log(self.k)  # (B,): log p(x) below
        loss = -bound.mean()
        return loss, {"iwae": loss.detach()}

    def log_importance_weights(self, x, num_samples, generator=None, *, labels=None, eps=None,
                               kl_weight=1.0):
        """log w_k = log p(x, z_k) - log q(z_k | x) for z_k ~ q(z | x): (num_samples, B); a
        conditional model's given the labels: log p(x, z_k | y) - log q(z_k | x, y).

        The IWAE bound log (1/K) sum_k w_k is a lower bound on log p(x) that tightens as K grows
        (Burda et al. 2015); K = 1 gives the ELBO. The constants log(2 pi) of p(z) and q(z|x)
        cancel. generator: the torch.Generator that draws the z_k (None: torch's global one); or
        pass the draws `eps` (K, B, D) themselves.
        """
        mu, logvar = self.posterior(x, labels)  # (B, D) each
        eps = standard_normal((num_samples, *mu.shape), generator, mu) if eps is None \
            else moved(eps, mu.device)  # (K, B, D)
        z = reparameterize(mu, logvar, eps=eps)  # (K, B, D)
        if labels is not None:  # each z_k decoded with its image's label: (K * B, 10)
            labels = label_vectors(labels, len(x), NUM_CLASSES, mu).repeat(num_samples, 1)
        logits = self.decode(z.reshape(-1, self.latent_dim), labels)  # (K * B, 784)
        logits = logits.reshape(num_samples, len(x), -1)  # (K, B, 784)
        log_likelihood = -bernoulli_nll_per_image(logits.float(), x)  # log p(x | z): (K, B)
        log_prior = -0.5 * z.pow(2).sum(dim=2)  # log p(z) + const
        log_posterior = -0.5 * (eps.pow(2) + logvar).sum(dim=2)  # log q(z | x) + the same const
        return log_likelihood + kl_weight * (log_prior - log_posterior)


def reparameterize(mu, logvar, generator=None, *, eps=None):
    """z = mu + sigma * eps with eps ~ N(0, I): the noise is an input, so gradients flow to mu
    and sigma; the one place a code is drawn from the posterior q(z | x). generator: the
    torch.Generator that draws eps (None: torch's global one); or pass the draws `eps` themselves
    (any shape that broadcasts against mu)."""
    if eps is None:
        eps = standard_normal(mu.shape, generator, mu)
    return mu + torch.exp(0.5 * logvar) * eps


def label_vectors(labels, count, num_classes, like):
    """The labels as (count, num_classes) vectors in the dtype and on the device of `like`: one-hot
    rows from classes (count,) or one class for all; or mixes of one-hot rows as they are."""
    labels = torch.as_tensor(labels)  # cast before it moves: MPS has no float64
    if labels.is_floating_point():
        return labels.to(like.dtype).to(like.device).expand(count, num_classes)
    return nn.functional.one_hot(labels.long().to(like.device).expand(count),
                                 num_classes).to(like.dtype)


def standard_normal(shape, generator, like):
    """N(0, I) draws of `shape`, made where `generator` lives (a CPU one gives the same draws on
    every device) and moved to the device and dtype of the tensor `like`."""
    device = generator.device if generator is not None else like.device
    return moved(torch.randn(shape, generator=generator, device=device, dtype=like.dtype),
                 like.device)


def moved(tensor, device):
    """`tensor` on `device`; from the CPU to a GPU through pinned memory, so that the CPU does not
    wait for the copy: it is queued on the current stream, behind the work queued there before."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def kl_to_standard_normal(mu, logvar):
    """KL( N(mu, diag(exp(logvar))) || N(0, I) ) in closed form, summed over the latent
    dimensions, mean over the batch. Per dimension 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2):
    zero exactly when mu = 0 and sigma = 1."""
    return kl_per_dimension(mu, logvar).sum(dim=1).mean()


def kl_per_dimension(mu, logvar):
    """(B, D) -> (B, D): each latent dimension's share of the KL to N(0, I)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def bernoulli_nll(logits, x):
    """-log p(x | z) under independent Bernoulli pixels: the BCE summed over pixels, mean over the
    batch. logits, x: (B, 784); grey pixels in [0, 1] are soft targets, as in the tutorials."""
    # float(): under --precision bf16 the logits come in bfloat16; the loss is summed in fp32
    return bernoulli_nll_per_image(logits.float(), x).sum() / x.shape[0]


class LatentGaussian:
    """N(mean, scale_tril @ scale_tril.T) over the codes: the prior N(0, I), or a Gaussian fitted to
    an AE's codes (an AE defines no distribution of its own to sample from; this one is its fair
    chance). draw() gives codes to decode, as Autoencoder.sample does."""

    def __init__(self, mean, scale_tril):
        self.mean, self.scale_tril = mean, scale_tril  # (D,), (D, D), on the CPU

    @classmethod
    def standard(cls, dim):
        return cls(torch.zeros(dim), torch.eye(dim))

    @classmethod
    def fitted(cls, codes):
        """The maximum-likelihood Gaussian of `codes` (N, D), with fitted_covariance's ridge."""
        mean, covariance = code_moments(codes)
        return cls(mean.float(), torch.linalg.cholesky(covariance).float())

    def draw(self, count, generator=None):
        """(count, D) codes, drawn on the CPU (generator: a CPU torch.Generator)."""
        eps = torch.randn(count, len(self.mean), generator=generator)
        return self.mean + eps @ self.scale_tril.T


def code_moments(codes):
    """The mean (D,) and fitted_covariance (D, D) of `codes` (N, D), float64 on the CPU: the
    Gaussian fitted to them, for sampling (LatentGaussian.fitted) and scoring."""
    return codes.detach().cpu().double().mean(dim=0), fitted_covariance(codes)


def fitted_covariance(codes, ridge=1e-6):
    """The covariance of `codes` (N, D) in float64 on the CPU, plus `ridge` on its diagonal, so that
    a dimension the codes never vary in still has a Gaussian (and a finite KL to N(0, I))."""
    codes = codes.detach().cpu().double()
    return torch.cov(codes.T).reshape(codes.shape[1], -1) + ridge * torch.eye(codes.shape[1],
                                                                            dtype=torch.float64)


MODEL_CLASSES = {"vae": VAE, "ae": Autoencoder}


def build_model(config):
    return MODEL_CLASSES[config.kind](
        latent_dim=config.latent_dim, hidden_dim=config.hidden_dim, image_dim=config.image_dim,
        arch=config.arch, hidden_layers=config.hidden_layers, beta=config.beta,
        condition=config.condition, objective=config.objective, k=config.k)


# ------------------------------------------------- extra training terms: perceptual, adversarial

class PerceptualNet(nn.Module):
    """A small CNN trained on the dataset's labels whose feature maps measure how far a decode is
    from its image. Not the scoring classifier (metrics.DigitClassifier): another shape (SiLU,
    strided convolutions, 24 and 48 channels) and another seed, so that training against it
    does not game the sample scores. (B, 784) -> (B, 10) logits; feature_maps() the two maps."""

    def __init__(self, *, num_classes=10):
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 24, 3, stride=2, padding=1),
                          nn.SiLU()),  # (B, 24, 14, 14)
            nn.Sequential(nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.SiLU()),  # (B, 48, 7, 7)
        ])
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(48 * 7 * 7, num_classes))

    def feature_maps(self, x):
        maps = []
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, x):
        return self.head(self.feature_maps(x)[-1])


def perceptual_distance(network, decoded, images):
    """Per image, the squared distance between the unit-normalised feature vectors of `decoded`
    and of `images` (B, 784, in [0, 1]) at each position of each feature map, summed over the
    positions and the maps (as LPIPS, without its learned weights); mean over the batch."""
    with torch.no_grad():
        targets = network.feature_maps(images)
    total = 0.0
    for ours, theirs in zip(network.feature_maps(decoded), targets):  # (B, C, H, W) each
        distance = (unit_channels(ours) - unit_channels(theirs)).pow(2).sum(dim=1)  # (B, H, W)
        total = total + distance.sum(dim=(1, 2)).mean()
    return total


def unit_channels(feature_map, eps=1e-10):
    return feature_map / (feature_map.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class Discriminator(nn.Module):
    """A PatchGAN discriminator (Isola et al. 2017) and its hinge loss: two strided 4x4
    convolutions with LeakyReLU, then one logit per patch: (B, 784) -> (B, 1, 7, 7)."""

    def __init__(self, *, channels=32):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # (B, C, 14, 14)
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),  # (B, 2C, 7, 7)
            nn.LeakyReLU(0.2), nn.Conv2d(2 * channels, 1, 3, padding=1),  # (B, 1, 7, 7)
        )

    def forward(self, images):
        return self.layers(images)

    def discriminator_loss(self, real, fake):
        """The hinge loss: mean relu(1 - D(real)) + mean relu(1 + D(fake)), halved as in
        taming-transformers; `fake` is detached, so that this loss never reaches the model."""
        real_loss, fake_loss = torch.relu(1 - self(real)), torch.relu(1 + self(fake.detach()))
        return 0.5 * (real_loss.mean() + fake_loss.mean())

    def model_loss(self, fake):
        """The model's adversarial term: -mean D(decode)."""
        return -self(fake).mean()


def adaptive_weight(reconstruction, adversarial, last_layer, *, eps=1e-4, most=1e4):
    """||d reconstruction / d last_layer|| / (||d adversarial / d last_layer|| + eps), clamped to
    [0, most] and detached: the adversarial term's gradient at the decoder's last layer then has
    the reconstruction's size (taming-transformers, calculate_adaptive_weight)."""
    rec_grad, = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    adv_grad, = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    return (rec_grad.norm() / (adv_grad.norm() + eps)).clamp(0, most).detach()


class TrainingObjective(nn.Module):
    """The model's loss plus the extra terms: perceptual_weight * perceptual_distance and
    adversarial_weight * adaptive_weight * (-mean D(decode)) once `adversarial_on`. forward
    returns (loss, parts) like the model's: the likelihood parts (bce, kl) as they are, the extra
    terms, weighted, as "perceptual" and "adversarial"; `decoded` keeps the last decodes
    (detached) for the discriminator's step. Its own parameters: the frozen perceptual network
    and the discriminator; the model's optimizer holds only the model's."""

    def __init__(self, *, model, perceptual_weight=0.0, perceptual=None, adversarial_weight=0.0,
                 discriminator=None):
        super().__init__()
        self.model, self.perceptual, self.discriminator = model, perceptual, discriminator
        self.perceptual_weight, self.adversarial_weight = perceptual_weight, adversarial_weight
        self.adversarial_on, self.decoded = False, None
        if perceptual is not None:
            perceptual.requires_grad_(False)
        layers = [m for m in model.decoder.modules() if isinstance(m, (nn.Linear, nn.Conv2d,
                                                                        nn.ConvTranspose2d))]
        self.last_layer = layers[-1].weight  # where the adaptive weight compares gradients

    def forward(self, x, labels=None, kl_weight=1.0, generator=None):
        loss, parts, logits = self.model.terms(x, labels, kl_weight, generator)
        decoded = torch.sigmoid(logits.float())  # (B, 784) in [0, 1]
        self.decoded = decoded.detach()
        if self.perceptual_weight > 0:
            term = self.perceptual_weight * perceptual_distance(self.perceptual, decoded, x)
            loss, parts["perceptual"] = loss + term, term.detach()
        if self.adversarial_weight > 0 and self.adversarial_on:
            adversarial = self.discriminator.model_loss(decoded)
            # the loss so far: its gradient at the decoder's last layer is the reconstruction's
            # (with the perceptual term's); the KL term does not reach the decoder
            weight = adaptive_weight(loss, adversarial, self.last_layer) \
                if torch.is_grad_enabled() else torch.ones(())
            term = self.adversarial_weight * weight * adversarial
            loss, parts["adversarial"] = loss + term, term.detach()
        return loss, parts


# ------------------------------------------------------------------------- encoders and decoders

def mlp(in_dim, hidden_dim, out_dim, hidden_layers=1):
    layers, width = [], in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, out_dim))


def conv_encoder(hidden_dim, out_dim, labels=0):
    """(B, 784 [+ labels]) -> (B, out_dim): two stride-2 convolutions (28 -> 14 -> 7), then an
    MLP; a conditional one sees the label as `labels` more input planes."""
    return nn.Sequential(
        image_planes(labels),  # (B, 1 + labels, 28, 28)
        nn.Conv2d(1 + labels, 32, 4, stride=2, padding=1), nn.ReLU(),  # (B, 32, 14, 14)
        nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),  # (B, 64, 7, 7)
        nn.Flatten(), mlp(64 * 7 * 7, hidden_dim, out_dim),
    )


def conv_decoder(latent_dim, hidden_dim, labels=0):
    """(B, latent_dim [+ labels]) -> (B, 784) logits: the mirror image of conv_encoder."""
    return nn.Sequential(
        mlp(latent_dim + labels, hidden_dim, 64 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (64, 7, 7)),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),  # (B, 32, 14, 14)
        nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),  # (B, 1, 28, 28)
        nn.Flatten(),
    )


def image_planes(labels):
    """A convnet's input: (B, 784) -> (B, 1, 28, 28); or with `labels` one-hot columns after the
    pixels, (B, 784 + labels) -> (B, 1 + labels, 28, 28), a plane per class, ones on the label's."""
    return LabelPlanes(labels) if labels else nn.Unflatten(1, (1, 28, 28))


class LabelPlanes(nn.Module):
    def __init__(self, labels):
        super().__init__()
        self.labels = labels

    def forward(self, x):
        image, label = x[:, :-self.labels], x[:, -self.labels:]
        planes = label[:, :, None, None].expand(-1, -1, 28, 28)  # (B, labels, 28, 28)
        return torch.cat([image.reshape(-1, 1, 28, 28), planes], dim=1)


RESNET_CHANNELS = (16, 24)  # the resnet's channels at 14x14 and at 7x7: an epoch in ~30 s on 2 cores


class ResBlock(nn.Module):
    """x + conv(SiLU(GroupNorm(conv(SiLU(GroupNorm(x)))))): (B, C, H, W) -> (B, C, H, W). With
    `labels`, the second GroupNorm's output is scaled and shifted per class (FiLM): a label
    reaches every position and channel, as a one-hot input alone reaches them only through the
    first layer."""

    def __init__(self, *, channels, labels=0):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        if labels:
            self.label_scale_shift = nn.Linear(labels, 2 * channels)
            nn.init.zeros_(self.label_scale_shift.weight)  # it starts as the plain block
            nn.init.zeros_(self.label_scale_shift.bias)

    def forward(self, x, label=None):
        if label is None:
            return x + self.body(x)
        h = self.body[:4](x)  # GroupNorm, SiLU, conv, GroupNorm: (B, C, H, W)
        scale, shift = self.label_scale_shift(label)[:, :, None, None].chunk(2, dim=1)
        return x + self.body[4:](h * (1 + scale) + shift)


class LabelledSequential(nn.Sequential):
    """nn.Sequential fed [x, one-hot label] (B, F + labels): the first layer takes all of it,
    each residual block the label too, for its per-class scale and shift."""

    def __init__(self, *layers, labels):
        super().__init__(*layers)
        self.labels = labels

    def forward(self, x):
        label = x[:, -self.labels:]
        for layer in self:
            x = layer(x, label) if isinstance(layer, ResBlock) else layer(x)
        return x


class SelfAttention(nn.Module):
    """One head of self-attention over the H*W positions, residual: (B, C, H, W) -> the same."""

    def __init__(self, *, channels):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, HW, C)
        attended = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.out(attended.transpose(1, 2).reshape(b, c, h, w))


def resnet_middle(channels, labels=0):
    """The middle block at 7x7: a residual block, attention over the 49 positions, another."""
    return [ResBlock(channels=channels, labels=labels), SelfAttention(channels=channels),
            ResBlock(channels=channels, labels=labels)]


def resnet_encoder(hidden_dim, out_dim, labels=0):
    """(B, 784 [+ labels]) -> (B, out_dim): down blocks 28 -> 14 -> 7 (a stride-2 convolution,
    then a residual block at 14x14; at 7x7 the middle block's), the middle block, then a linear
    layer of hidden_dim units; a conditional one sees the label as `labels` more input planes."""
    c1, c2 = RESNET_CHANNELS
    return nn.Sequential(
        image_planes(labels),  # (B, 1 + labels, 28, 28)
        nn.Conv2d(1 + labels, c1, 4, stride=2, padding=1), ResBlock(channels=c1),  # (B, c1, 14, 14)
        nn.Conv2d(c1, c2, 4, stride=2, padding=1),  # (B, c2, 7, 7)
        *resnet_middle(c2), nn.GroupNorm(8, c2), nn.SiLU(),
        nn.Flatten(), nn.Linear(c2 * 7 * 7, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, out_dim),
    )


def resnet_decoder(latent_dim, hidden_dim, labels=0):
    """(B, latent_dim [+ labels]) -> (B, 784) logits: the mirror image of resnet_encoder. Nothing
    reaches it from the encoder but z (no U-Net skips), so that it decodes z ~ N(0, I) as it
    decodes codes. A conditional one takes [z, y], and its residual blocks scale and shift their
    features per class (LabelledSequential)."""
    c1, c2 = RESNET_CHANNELS
    layers = [
        nn.Linear(latent_dim + labels, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, c2 * 7 * 7),
        nn.Unflatten(1, (c2, 7, 7)), *resnet_middle(c2, labels),
        nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1),  # (B, c1, 14, 14)
        ResBlock(channels=c1, labels=labels), nn.GroupNorm(8, c1), nn.SiLU(),
        nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),  # (B, 1, 28, 28)
        nn.Flatten(),
    ]
    return LabelledSequential(*layers, labels=labels) if labels else nn.Sequential(*layers)


# ------------------------------------------------------------------ the Bernoulli NLL, made fast

def bernoulli_nll_per_image(logits, x):
    """(..., 784) logits and pixels (broadcast) -> (...): -log p(x | z) of each image under
    independent Bernoulli pixels, the sum over pixels of

        softplus(l) - x * l,    which is    -[x log sigmoid(l) + (1 - x) log(1 - sigmoid(l))],

    i.e. F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1), to 1e-7 nats a
    pixel. _BernoulliNLL computes it faster on a CPU, with its gradient sigmoid(l) - x."""
    return _BernoulliNLL.apply(logits, x)


class _BernoulliNLL(torch.autograd.Function):
    """softplus(l) = max(l, 0) + log(1 + exp(-|l|)): never overflows, and uses exp and log, which a
    CPU vectorizes, unlike log1p (which F.softplus and F.binary_cross_entropy use). Computed in
    place in one buffer, per image first (a whole-tensor sum would split by the thread count);
    autograd keeps only the logits and x. 0.7 ms a step faster on a CPU than
    F.binary_cross_entropy_with_logits (a quarter of a step)."""

    @staticmethod
    def forward(ctx, logits, x):
        ctx.save_for_backward(logits, x)
        nll = logits.abs().neg_().exp_().add_(1).log_().add_(logits.clamp(min=0))  # softplus(l)
        return nll.sub_(x * logits).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad):
        logits, x = ctx.saved_tensors
        return grad[..., None] * (torch.sigmoid(logits) - x), None  # the pixels x are data
