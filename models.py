"""A plain autoencoder (AE) and a variational autoencoder (VAE) for 28x28 images.

Both share one MLP encoder/decoder shape and compute their own loss, so the training loop in
main.py treats them alike: `loss, parts = model(x)`. Images are flattened to 784 pixels in [0, 1].
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


def mlp(in_dim, hidden_dim, out_dim):
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))


class _SummedBCEWithLogits(torch.autograd.Function):
    """sum(softplus(l) - x * l) over all elements, with its exact gradient sigmoid(l) - x.

    Same value as F.binary_cross_entropy_with_logits(reduction="sum") to within 1e-7 nats per pixel, but
    built from exp and log, which are vectorized on the CPU, where log1p (which that function uses) is not:
    it was a quarter of the whole training step. softplus(l) = max(l, 0) + log(1 + exp(-|l|)) never overflows.
    """

    @staticmethod
    def forward(ctx, logits, x):
        ctx.save_for_backward(logits, x)
        softplus = logits.clamp(min=0) + torch.log(1 + torch.exp(-logits.abs()))
        return (softplus - x * logits).sum()

    @staticmethod
    def backward(ctx, grad):
        logits, x = ctx.saved_tensors
        return grad * (torch.sigmoid(logits) - x), None  # the pixels x are data: no gradient


def bernoulli_nll(logits, x):
    """-log p(x | z) under independent Bernoulli pixels: BCE summed over pixels, mean over the batch.

    logits, x: (B, 784). Grey pixels in [0, 1] are used as soft targets, as in the classic tutorials.
    """
    return _SummedBCEWithLogits.apply(logits, x) / x.shape[0]


def kl_to_standard_normal(mu, logvar):
    """KL( N(mu, diag(exp(logvar))) || N(0, I) ) in closed form, summed over latent dims, mean over the batch.

    Per dimension: 0.5 * (mu^2 + sigma^2 - 1 - log sigma^2); it is zero exactly when mu = 0, sigma = 1.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()


def reparameterize(mu, logvar):
    """z = mu + sigma * eps with eps ~ N(0, I): the noise is an input, so gradients flow to mu and sigma."""
    eps = torch.randn_like(mu)
    return mu + torch.exp(0.5 * logvar) * eps


class Autoencoder(nn.Module):
    """Deterministic AE: x -> z = encoder(x) -> decoder(z) = pixel logits. Loss: Bernoulli NLL only."""

    def __init__(self, *, latent_dim=20, hidden_dim=400, image_dim=784):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = mlp(image_dim, hidden_dim, self.encoder_outputs(latent_dim))
        self.decoder = mlp(latent_dim, hidden_dim, image_dim)

    @staticmethod
    def encoder_outputs(latent_dim):
        return latent_dim

    def encode(self, x):
        """(B, 784) -> (B, latent_dim) code; for the VAE, the posterior mean."""
        return self.encoder(x)

    def decode(self, z):
        """(B, latent_dim) -> (B, 784) pixel logits; sigmoid gives the image."""
        return self.decoder(z)

    def forward(self, x):
        """x: (B, 784) -> (loss, parts); loss is per image in nats, averaged over the batch."""
        reconstruction = bernoulli_nll(self.decode(self.encode(x)), x)
        return reconstruction, {"bce": reconstruction.detach()}


class VAE(Autoencoder):
    """VAE: the encoder gives q(z|x) = N(mu, diag(sigma^2)); loss is the negative ELBO,
    -E_q[log p(x|z)] + KL(q(z|x) || N(0, I)), with one sample of z per image."""

    @staticmethod
    def encoder_outputs(latent_dim):
        return 2 * latent_dim  # mu and log sigma^2

    def posterior(self, x):
        """(B, 784) -> mu, logvar, each (B, latent_dim)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    def encode(self, x):
        return self.posterior(x)[0]

    def forward(self, x):
        mu, logvar = self.posterior(x)
        z = reparameterize(mu, logvar)  # sampled in eval mode too: the test loss is the sampled ELBO
        reconstruction = bernoulli_nll(self.decode(z), x)
        kl = kl_to_standard_normal(mu, logvar)
        return reconstruction + kl, {"bce": reconstruction.detach(), "kl": kl.detach()}


MODEL_CLASSES = {"vae": VAE, "ae": Autoencoder}


def build_model(config):
    return MODEL_CLASSES[config.kind](
        latent_dim=config.latent_dim, hidden_dim=config.hidden_dim, image_dim=config.image_dim
    )
