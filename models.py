"""The models and their losses, pure: a plain autoencoder (AE) and a variational autoencoder (VAE).
No files, no devices, no training loop and no scores here (metrics.py scores them).

Both autoencoders share one encoder/decoder shape (an MLP, or a small convnet with --arch conv) and
compute their own loss, so that main.py's training loop treats them alike: `loss, parts = model(x)`.
Images are flattened to 784 pixels in [0, 1]. Read the AE, then the VAE: what it adds is
`posterior`, `reparameterize`, the KL term and `log_importance_weights`.
"""
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in its checkpoint."""
    kind: str  # "vae" or "ae"
    latent_dim: int = 20
    hidden_dim: int = 400
    image_dim: int = 784  # 28 * 28 pixels, flattened
    arch: str = "mlp"  # "mlp" or "conv"
    hidden_layers: int = 1  # MLP hidden layers in the encoder and in the decoder
    beta: float = 1.0  # weight of the KL term in the VAE's training loss (1: the ELBO)


class Autoencoder(nn.Module):
    """A deterministic AE: x -> z = encoder(x) -> decoder(z) = pixel logits. Its loss: the
    Bernoulli NLL of x."""

    def __init__(self, *, latent_dim=20, hidden_dim=400, image_dim=784, arch="mlp",
                 hidden_layers=1, beta=1.0):
        super().__init__()
        self.latent_dim, self.beta = latent_dim, beta
        outputs = self.encoder_outputs(latent_dim)
        if arch == "conv":
            assert image_dim == 784, "the conv architecture is built for 28x28 images"
            self.encoder = conv_encoder(hidden_dim, outputs)
            self.decoder = conv_decoder(latent_dim, hidden_dim)
        else:
            self.encoder = mlp(image_dim, hidden_dim, outputs, hidden_layers)
            self.decoder = mlp(latent_dim, hidden_dim, image_dim, hidden_layers)

    @staticmethod
    def encoder_outputs(latent_dim):
        return latent_dim

    def encode(self, x):
        """(B, 784) -> (B, latent_dim) code; for the VAE, the posterior mean."""
        return self.encoder(x)

    def decode(self, z):
        """(B, latent_dim) -> (B, 784) pixel logits; sigmoid gives the image."""
        return self.decoder(z)

    def forward(self, x, kl_warmup=1.0, noise=None):
        """x: (B, 784) -> (loss, parts): the loss per image in nats, averaged over the batch.
        kl_warmup and noise (the VAE's generator for z) are accepted so that the training loop
        treats both models alike: the AE has no KL term and draws nothing."""
        reconstruction = bernoulli_nll(self.decode(self.encode(x)), x)
        return reconstruction, {"bce": reconstruction.detach()}


class VAE(Autoencoder):
    """The encoder gives q(z|x) = N(mu, diag(sigma^2)); the loss is the negative ELBO,
    -E_q[log p(x|z)] + KL(q(z|x) || N(0, I)), with one sample of z per image."""

    @staticmethod
    def encoder_outputs(latent_dim):
        return 2 * latent_dim  # mu and log sigma^2

    def posterior(self, x):
        """(B, 784) -> mu, logvar, each (B, latent_dim), in fp32 (the encoder may run in bf16)."""
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar

    def encode(self, x):
        return self.posterior(x)[0]

    def forward(self, x, kl_warmup=1.0, noise=None):
        """kl_warmup in [0, 1] scales the KL weight beta during a warm-up; the parts are always
        unweighted, so bce + kl is the negative ELBO. noise: the torch.Generator that draws z."""
        mu, logvar = self.posterior(x)
        z = reparameterize(mu, logvar, noise)  # sampled in eval mode too: the sampled test ELBO
        reconstruction = bernoulli_nll(self.decode(z), x)
        kl = kl_to_standard_normal(mu, logvar)
        loss = reconstruction + (kl_warmup * self.beta) * kl
        return loss, {"bce": reconstruction.detach(), "kl": kl.detach()}

    def log_importance_weights(self, x, num_samples, noise=None):
        """log w_k = log p(x, z_k) - log q(z_k | x) for z_k ~ q(z | x): (num_samples, B).

        The IWAE bound log (1/K) sum_k w_k is a lower bound on log p(x) that tightens as K grows
        (Burda et al. 2015); K = 1 gives the ELBO. The constants log(2 pi) of p(z) and q(z|x)
        cancel. noise: the torch.Generator that draws the z_k (None: torch's global one).
        """
        mu, logvar = self.posterior(x)  # (B, D) each
        eps = torch.randn(num_samples, *mu.shape, generator=noise, device=x.device)  # (K, B, D)
        z = reparameterize(mu, logvar, eps=eps)  # (K, B, D)
        logits = self.decode(z.reshape(-1, self.latent_dim)).reshape(num_samples, len(x), -1)
        log_likelihood = -bernoulli_nll_per_image(logits, x)  # log p(x | z): (K, B)
        log_prior = -0.5 * z.pow(2).sum(dim=2)  # log p(z) + const
        log_posterior = -0.5 * (eps.pow(2) + logvar).sum(dim=2)  # log q(z | x) + the same const
        return log_likelihood + log_prior - log_posterior


def reparameterize(mu, logvar, noise=None, *, eps=None):
    """z = mu + sigma * eps with eps ~ N(0, I): the noise is an input, so gradients flow to mu
    and sigma. noise: the torch.Generator that draws eps (None: torch's global one); or pass the
    draws `eps` themselves (any shape that broadcasts against mu)."""
    if eps is None:
        eps = torch.randn(mu.shape, generator=noise, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


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


MODEL_CLASSES = {"vae": VAE, "ae": Autoencoder}


def build_model(config):
    return MODEL_CLASSES[config.kind](
        latent_dim=config.latent_dim, hidden_dim=config.hidden_dim, image_dim=config.image_dim,
        arch=config.arch, hidden_layers=config.hidden_layers, beta=config.beta)


# ------------------------------------------------------------------------- encoders and decoders

def mlp(in_dim, hidden_dim, out_dim, hidden_layers=1):
    layers, width = [], in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, out_dim))


def conv_encoder(hidden_dim, out_dim):
    """(B, 784) -> (B, out_dim): two stride-2 convolutions (28 -> 14 -> 7), then an MLP."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)),
        nn.Conv2d(1, 32, 4, stride=2, padding=1), nn.ReLU(),  # (B, 32, 14, 14)
        nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),  # (B, 64, 7, 7)
        nn.Flatten(), mlp(64 * 7 * 7, hidden_dim, out_dim),
    )


def conv_decoder(latent_dim, hidden_dim):
    """(B, latent_dim) -> (B, 784) logits: the mirror image of conv_encoder."""
    return nn.Sequential(
        mlp(latent_dim, hidden_dim, 64 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (64, 7, 7)),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),  # (B, 32, 14, 14)
        nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),  # (B, 1, 28, 28)
        nn.Flatten(),
    )


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
