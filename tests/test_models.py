import math

import pytest
import torch

from models import VAE, Autoencoder, ModelConfig, build_model, kl_to_standard_normal, reparameterize

KINDS = ["vae", "ae"]


ARCHITECTURES = [dict(arch="mlp"), dict(arch="mlp", hidden_layers=2), dict(arch="conv")]


def tiny(kind, latent_dim=3, **architecture):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, latent_dim=latent_dim, hidden_dim=32, **architecture))


def binary_batch(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 784, generator=generator) > 0.7).float()


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=["mlp", "mlp2", "conv"])
@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_finite_loss(kind, architecture):
    model = tiny(kind, **architecture)
    x = binary_batch()
    assert model.encode(x).shape == (16, 3)
    assert model.decode(torch.zeros(5, 3)).shape == (5, 784)
    loss, parts = model(x)
    assert loss.shape == ()
    assert math.isfinite(loss.item())
    expected_parts = {"bce", "kl"} if kind == "vae" else {"bce"}
    assert set(parts) == expected_parts
    assert loss.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=["mlp", "mlp2", "conv"])
def test_the_vae_is_the_ae_with_an_encoder_that_outputs_mu_and_log_sigma2(architecture):
    vae, ae = tiny("vae", **architecture), tiny("ae", **architecture)
    assert type(vae) is VAE and type(ae) is Autoencoder
    vae_shapes = {name: p.shape for name, p in vae.named_parameters()}
    ae_shapes = {name: p.shape for name, p in ae.named_parameters()}
    last = [name for name in vae_shapes if name.startswith("encoder.")][-2:]  # the last layer's weight, bias
    assert vae_shapes.keys() == ae_shapes.keys()
    assert {name for name in vae_shapes if vae_shapes[name] != ae_shapes[name]} == set(last)
    assert all(vae_shapes[name][0] == 2 * ae_shapes[name][0] for name in last)


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=["mlp", "mlp2", "conv"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind, architecture):
    model = tiny(kind, **architecture)
    loss, _ = model(binary_batch())
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_kl_is_zero_at_the_prior_and_matches_torch_distributions():
    zeros = torch.zeros(4, 6)
    assert kl_to_standard_normal(zeros, zeros).item() == 0.0
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(posterior, prior).sum(1).mean()
    assert kl_to_standard_normal(mu, logvar).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_to_standard_normal(mu, logvar).item() > 0


def test_reparameterize_has_the_right_moments_and_passes_gradients():
    torch.manual_seed(0)
    mu = torch.tensor([[1.5, -2.0]]).repeat(200_000, 1).requires_grad_()
    logvar = torch.tensor([[0.0, math.log(0.25)]]).repeat(200_000, 1).requires_grad_()
    z = reparameterize(mu, logvar)
    assert z.mean(0).tolist() == pytest.approx([1.5, -2.0], abs=0.01)
    assert z.std(0).tolist() == pytest.approx([1.0, 0.5], abs=0.01)
    z.sum().backward()
    assert mu.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_vae_samples_z_in_eval_mode_too():
    model = tiny("vae").eval()
    x = binary_batch()
    with torch.no_grad():
        assert model(x)[0].item() != model(x)[0].item()  # the test loss is the sampled negative ELBO
        assert torch.equal(model.encode(x), model.encode(x))  # codes are posterior means


@pytest.mark.parametrize("kind", KINDS)
def test_a_few_steps_overfit_one_batch(kind):
    model = tiny(kind, latent_dim=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = binary_batch(n=8)
    first_loss = model(x)[0].item()
    for _ in range(300):
        loss, _ = model(x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # binary pixels have a BCE floor of 0; an untrained model sits near 784 * log 2 = 543 nats
    assert first_loss > 400
    assert loss.item() < 0.1 * first_loss


def test_bernoulli_nll_matches_torch_on_extreme_logits():
    import torch.nn.functional as F
    from models import bernoulli_nll

    logits = torch.cat([torch.linspace(-120, 120, 783)[None], 8 * torch.randn(7, 783)])  # the first row holds 0
    logits = torch.cat([logits, torch.zeros(8, 1)], dim=1)
    x = torch.rand(8, 784)
    x[0, ::2] = 0.0
    x[0, 1::2] = 1.0
    expected = F.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="sum") / 8
    assert bernoulli_nll(logits, x).item() == pytest.approx(expected.item(), rel=1e-6)
    logits.requires_grad_()
    bernoulli_nll(logits, x).backward()
    assert torch.allclose(logits.grad, (torch.sigmoid(logits) - x) / 8, atol=1e-7)


def test_bernoulli_nll_per_image_has_exact_gradients_when_x_broadcasts():
    # the IWAE's shapes: logits (K, B, pixels), images (B, pixels); the gradient is hand-written
    from models import bernoulli_nll_per_image

    logits = (8 * torch.randn(3, 2, 5, dtype=torch.float64)).requires_grad_()
    x = torch.rand(2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda l: bernoulli_nll_per_image(l, x), (logits,))


def test_gradients_reach_every_parameter_through_the_iwae_bound():
    model = tiny("vae")
    log_weights = model.log_importance_weights(torch.rand(4, 784), 3)  # (K, B)
    torch.logsumexp(log_weights, dim=0).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_one_hidden_layer_keeps_the_parameter_names_of_earlier_checkpoints():
    names = set(tiny("vae").state_dict())
    assert names == {f"{part}.{index}.{tensor}" for part in ("encoder", "decoder") for index in (0, 2)
                     for tensor in ("weight", "bias")}
    assert len(tiny("vae", hidden_layers=3).state_dict()) == 2 * 4 * 2


# ------------------------------------------------------------------ conditional models (--condition label)

def conditional(kind, arch="mlp", latent_dim=3):
    torch.manual_seed(0)
    return build_model(ModelConfig(kind=kind, latent_dim=latent_dim, hidden_dim=32, arch=arch, condition="label"))


@pytest.mark.parametrize("arch", ["mlp", "conv", "resnet"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_conditional_model_gives_shapes_finite_losses_and_gradients_for_every_arch(kind, arch):
    model, x, labels = conditional(kind, arch), binary_batch(), torch.arange(16) % 10
    assert model.encode(x, labels).shape == (16, 3) and model.decode(torch.zeros(5, 3), 7).shape == (5, 784)
    loss, parts = model(x, labels, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item()) and set(parts) == ({"bce", "kl"} if kind == "vae" else {"bce"})
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="conditional"):
        model.encode(x)


@pytest.mark.parametrize("arch", ["mlp", "conv", "resnet"])
def test_the_decoded_image_changes_with_the_label_for_a_fixed_code(arch):
    model, z = conditional("vae", arch), torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for parameter in model.parameters():  # weights large enough that every path matters
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
        decodes = torch.stack([model.decode(z, label) for label in range(10)])  # (10, 4, 784)
    assert ((decodes[1:] - decodes[:1]).abs().amax(dim=(1, 2)) > 1e-3).all()
    assert torch.allclose(model.decode(z, torch.full((4,), 7)), decodes[7])  # a class each or one for all
    halfway = torch.zeros(4, 10)
    halfway[:, 2] = halfway[:, 7] = 0.5  # a mix of two labels, as along an interpolation
    assert model.decode(z, halfway).shape == (4, 784)


def test_a_conditional_vaes_kl_is_zero_at_the_prior_and_the_mlp_takes_z_then_the_label():
    model = conditional("vae")
    first_encoder, first_decoder = model.encoder[0], model.decoder[0]
    assert first_encoder.in_features == 784 + 10 and first_decoder.in_features == 3 + 10  # [x, y] and [z, y]
    with torch.no_grad():
        model.encoder[-1].weight.zero_(), model.encoder[-1].bias.zero_()  # mu = 0, log sigma^2 = 0
    _, parts = model(binary_batch(), torch.arange(16) % 10)
    assert parts["kl"].item() == 0.0
    z, label = torch.randn(2, 3), torch.tensor([4, 9])
    by_hand = first_decoder(torch.cat([z, torch.nn.functional.one_hot(label, 10).float()], dim=1))
    assert torch.allclose(model.decoder[:1](model.with_label(z, label)), by_hand)


# --------------------------------------------------------------------- training on the IWAE bound

def test_the_iwae_objective_at_k_1_is_the_elbo_loss_and_gradients_exactly():
    elbo, iwae = tiny("vae"), tiny("vae", objective="iwae", k=1)
    iwae.load_state_dict(elbo.state_dict())
    x = torch.rand(8, 784).bernoulli()
    losses = []
    for model in (elbo, iwae):
        loss, _ = model(x, kl_weight=0.3, generator=torch.Generator().manual_seed(5))
        loss.backward()
        losses.append(loss)
    assert torch.equal(*losses)
    for (name, a), b in zip(elbo.named_parameters(), iwae.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_the_iwae_loss_is_minus_the_log_mean_of_the_k_importance_weights_and_trains_every_parameter():
    model, x = tiny("vae", objective="iwae", k=4), torch.rand(6, 784).bernoulli()
    loss, parts = model(x, generator=torch.Generator().manual_seed(2))
    log_weights = model.log_importance_weights(x, 4, torch.Generator().manual_seed(2))  # the same draws
    expected = -(torch.logsumexp(log_weights.double(), dim=0) - math.log(4)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and set(parts) == {"iwae"}
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_the_iwae_bound_rises_with_k_for_a_fixed_model():
    torch.manual_seed(0)
    base, x = tiny("vae"), torch.rand(16, 784).bernoulli()
    means = []
    for k in (1, 5, 50):
        model = tiny("vae", objective="iwae", k=k)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():  # -bound averaged over 20 draws: the spread is far below the gaps
            means.append(sum(model(x, generator=torch.Generator().manual_seed(s))[0].item()
                             for s in range(20)) / 20)
    assert means[0] > means[1] > means[2], means


def test_a_warm_up_weighs_the_iwae_prior_and_posterior_terms_as_the_elbos_kl():
    model, x = tiny("vae", objective="iwae", k=3), torch.rand(4, 784).bernoulli()
    log_weights = model.log_importance_weights(x, 3, torch.Generator().manual_seed(1), kl_weight=0.0)
    likelihood_only = model.log_importance_weights(x, 3, torch.Generator().manual_seed(1))
    assert not torch.allclose(log_weights, likelihood_only)
    loss, _ = model(x, kl_weight=0.0, generator=torch.Generator().manual_seed(1))
    assert loss.item() == pytest.approx(-(torch.logsumexp(log_weights, 0) - math.log(3)).mean().item(), rel=1e-5)
