"""Each metric on a case whose answer is known."""
import json
import math

import pytest
import torch
from torch import nn

import metrics
import training
import utils
from models import LatentGaussian, ModelConfig, build_model


def tiny_vae(latent_dim=3, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(kind="vae", latent_dim=latent_dim, hidden_dim=32))


def binary_images(n=8, seed=0):
    return (torch.rand(n, 784, generator=torch.Generator().manual_seed(seed)) > 0.7).float()


def test_log_importance_weights_match_torch_distributions():
    model, x = tiny_vae(), binary_images()
    torch.manual_seed(1)
    log_weights = model.log_importance_weights(x, 5)  # (5, 8)
    torch.manual_seed(1)
    eps = torch.randn(5, 8, 3)
    mu, logvar = model.posterior(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    likelihood = torch.distributions.Bernoulli(logits=model.decode(z)).log_prob(x).sum(-1)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    assert torch.allclose(log_weights, likelihood + prior - posterior, atol=1e-3)


def test_iwae_is_exact_when_the_posterior_is_exact():
    """Decoder ignores z and q(z|x) = p(z) = N(0, I): every weight is p(x), so any K (and any chunking) is exact."""
    model, x = tiny_vae(), binary_images()
    with torch.no_grad():
        nn.init.zeros_(model.encoder[-1].weight), nn.init.zeros_(model.encoder[-1].bias)  # mu = 0, log sigma^2 = 0
        nn.init.zeros_(model.decoder[-1].weight)
        model.decoder[-1].bias.copy_(torch.linspace(-3, 3, 784))
    bias = model.decoder[-1].bias.detach()
    exact = -torch.distributions.Bernoulli(logits=bias).log_prob(x).sum(1).mean().item()
    for samples, chunk in [(1, 500), (37, 10)]:
        assert metrics.iwae_nll(model, x, samples, batch_size=3, chunk_size=chunk) == pytest.approx(exact, rel=1e-5)


def test_iwae_k1_is_the_elbo_in_expectation_and_tightens_with_k():
    model, x = tiny_vae(), binary_images(n=4)
    torch.manual_seed(0)
    negative_elbo = sum(metrics.evaluate_loss(model, x)["loss"] for _ in range(2000)) / 2000
    k1 = sum(metrics.iwae_nll(model, x, 1) for _ in range(2000)) / 2000
    k1000 = metrics.iwae_nll(model, x, 1000)
    assert k1 == pytest.approx(negative_elbo, abs=0.5)  # both are Monte Carlo means; their sd here is ~0.1
    assert k1000 < k1 - 1.0


def test_frechet_distance_known_answers():
    a = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) + 1.0
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # b = 2a: mean doubles, covariance quadruples: |m|^2 + tr(S + 4S - 2 * 2S) = |m|^2 + tr(S)
    expected = (a.double().mean(0).pow(2).sum() + torch.trace(torch.cov(a.double().T))).item()
    assert metrics.frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)
    assert metrics.frechet_distance(a, a + 3.0) == pytest.approx(9.0 * 6, rel=1e-6)  # shift only


def test_histogram_entropy_and_sample_quality_shares():
    assert metrics.histogram_entropy(torch.arange(1000) % 10) == pytest.approx(math.log2(10))
    assert metrics.histogram_entropy(torch.full((50,), 3)) == 0.0
    samples = torch.full((8, 784), 0.01)
    samples[torch.arange(6), torch.tensor([0, 0, 0, 1, 1, 1])] = 0.99  # six sure of class 0 or 1
    samples[6:, :10] = 0.5  # two greys, a little brighter at pixel 2 or 3: classes 2 and 3, unsure
    samples[6, 2] = samples[7, 3] = 0.55
    scores = metrics.sample_quality(FirstTenPixels(), samples, torch.rand(50, 10))
    assert scores["confident_share"] == 0.75
    shares = torch.tensor([3, 3, 1, 1]) / 8
    assert scores["class_entropy_bits"] == pytest.approx(-(shares * shares.log2()).sum().item())


def test_knn_accuracy_separable_and_leave_one_out():
    labels = torch.arange(100) % 4
    separable = labels[:, None].float() * 10 + 0.01 * torch.randn(100, 2)
    assert metrics.knn_accuracy(separable, labels) == 1.0
    # each point's nearest other point has the other label: 0 with k = 1, but 1 if it could pick itself
    codes, labels = torch.tensor([[0.0], [1.0], [10.0], [11.0]]), torch.tensor([0, 1, 0, 1])
    assert metrics.knn_accuracy(codes, labels, k=1) == 0.0


def test_gaussian_kl_to_standard_normal():
    generator = torch.Generator().manual_seed(0)
    assert metrics.gaussian_kl_to_standard(torch.randn(200_000, 4, generator=generator)) < 1e-3
    codes = torch.randn(5000, 3, generator=generator) @ torch.tensor([[2.0, 0, 0], [0.5, 1, 0], [0, 0, 0.3]]) + 1.5
    mean, covariance = codes.double().mean(0), torch.cov(codes.double().T) + 1e-6 * torch.eye(3, dtype=torch.double)
    fitted = torch.distributions.MultivariateNormal(mean, covariance)  # with the fitted Gaussian's ridge
    zero, identity = torch.zeros(3, dtype=torch.double), torch.eye(3, dtype=torch.double)
    standard = torch.distributions.MultivariateNormal(zero, identity)
    expected = torch.distributions.kl_divergence(fitted, standard).item()
    assert metrics.gaussian_kl_to_standard(codes) == pytest.approx(expected, rel=1e-9)


def test_a_collapsed_code_dimension_keeps_the_kl_finite_and_metrics_json_valid(tmp_path):
    codes = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0))
    codes[:, 1] = 0.25  # a dimension the codes never vary in
    statistics = metrics.code_statistics(codes)
    assert math.isfinite(statistics["gaussian_kl_to_prior"]) and statistics["gaussian_kl_to_prior"] > 5
    utils.save_json(tmp_path / "metrics.json", {"latent": statistics})
    assert json.loads((tmp_path / "metrics.json").read_text(), parse_constant=pytest.fail)["latent"] == statistics
    with pytest.raises(utils.ProjectError, match=r"vae\.latent\.kl is inf; nothing is written"):
        utils.save_json(tmp_path / "metrics.json", {"vae": {"latent": {"kl": math.inf}}})


def test_fitted_gaussian_reproduces_the_codes_moments():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(20_000, 3, generator=generator) @ torch.tensor([[1.0, 0, 0], [0.8, 0.5, 0], [0, 0, 2]]) - 2
    samples = LatentGaussian.fitted(codes).draw(20_000, torch.Generator().manual_seed(1))
    assert torch.allclose(samples.mean(0), codes.mean(0), atol=0.05)
    assert torch.allclose(torch.cov(samples.T), torch.cov(codes.T), atol=0.1)
    standard = LatentGaussian.standard(3).draw(20_000, torch.Generator().manual_seed(1))
    assert torch.allclose(torch.cov(standard.T), torch.eye(3), atol=0.05)


def test_active_units_count_the_dimensions_whose_mean_varies():
    model, x = tiny_vae(latent_dim=5), binary_images(n=64)
    with torch.no_grad():
        last = model.encoder[-1]  # rows 0-4: mu, rows 5-9: log sigma^2
        last.weight[:2] = 0.0  # mu_0, mu_1 constant over x: inactive
        last.weight[2:5] *= 100.0  # mu_2..mu_4 vary a lot: active
    statistics = metrics.posterior_statistics(*model.posterior(x))
    assert statistics["active_units"] == 3
    assert statistics["posterior_mean_variance"][0] == pytest.approx(0.0, abs=1e-10)
    assert len(statistics["kl_per_dimension"]) == 5 and min(statistics["kl_per_dimension"]) >= 0


class OffsetModel(nn.Module):
    """Reconstructs every pixel 0.1 too bright: MSE is exactly 0.01, PSNR 20 dB."""

    def encode(self, x):
        return x

    def decode(self, z, labels=None):
        return torch.logit(z + 0.1)


def test_reconstruction_errors_known_psnr():
    images = torch.rand(10, 784, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.05
    errors = metrics.reconstruction_errors(OffsetModel(), images, images, images)
    assert errors["mse"] == pytest.approx(0.01, rel=1e-4)
    assert errors["psnr"] == pytest.approx(20.0, rel=1e-4)


def test_classifier_is_trained_once_then_read_from_its_cache(tmp_path, monkeypatch):
    labels = torch.arange(1000) % 10
    images = torch.zeros(1000, 784)
    for i, label in enumerate(labels):  # a bright column per digit: easy to learn
        images[i].view(28, 28)[:, 2 + 2 * label] = 1.0
    data = {"train": (images, labels), "test": (images, labels)}
    classifier, accuracy = metrics.scoring_classifier("mnist", data, utils.Phases())
    assert (tmp_path / "checkpoints" / "classifier-mnist.pt").is_file() and accuracy > 0.9  # tmp_path: the cwd
    monkeypatch.setattr(metrics, "train_classifier", lambda *a, **k: pytest.fail("retrained despite the cache"))
    cached, cached_accuracy = metrics.scoring_classifier("mnist", data, utils.Phases())
    assert cached_accuracy == accuracy
    assert all(torch.equal(a, b) for a, b in zip(classifier.state_dict().values(), cached.state_dict().values()))


def test_binarized_targets():
    images = torch.rand(50, 784)
    assert utils.binarized(images, "none", "test") is images
    assert utils.binarized(images, "dynamic", "train") is images  # train_epoch samples each batch afresh
    static = utils.binarized(images, "static", "train")
    assert set(static.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(static, utils.binarized(images, "static", "train"))  # a fixed sample
    assert torch.equal(utils.binarized(images, "dynamic", "test"), utils.binarized(images, "static", "test"))


def test_kl_warmup_and_cosine_schedule():
    assert training.kl_weight_range(1, 0) == (1.0, 1.0)
    assert training.kl_weight_range(1, 4) == (0.0, 0.25)
    assert training.kl_weight_range(4, 4) == (0.75, 1.0)
    assert training.kl_weight_range(9, 4) == (1.0, 1.0)
    assert training.learning_rate(1e-3, "constant", 7, 10) == 1e-3
    assert training.learning_rate(1e-3, "cosine", 1, 10) == 1e-3
    assert training.learning_rate(1e-3, "cosine", 6, 10) == pytest.approx(0.5e-3)


def test_beta_and_warmup_weight_only_the_training_loss():
    model, x = tiny_vae(), binary_images()
    model.beta = 4.0
    torch.manual_seed(0)
    loss, parts = model(x, kl_weight=0.5)
    assert loss.item() == pytest.approx((parts["bce"] + 2.0 * parts["kl"]).item(), rel=1e-6)
    torch.manual_seed(0)
    loss_without_kl, _ = model(x, kl_weight=0.0)
    assert loss_without_kl.item() == pytest.approx(parts["bce"].item(), rel=1e-6)


def test_ssim_known_answers():
    images = torch.rand(4, 784, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(metrics.ssim(images, images), torch.ones(4), atol=1e-6)
    # two flat images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b, c1 = 0.2, 0.6, 0.01**2
    flat_a, flat_b = torch.full((1, 784), a), torch.full((1, 784), b)
    assert metrics.ssim(flat_a, flat_b).item() == pytest.approx((2 * a * b + c1) / (a**2 + b**2 + c1), rel=1e-4)
    noisy = (images + 0.2 * torch.randn(4, 784, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert torch.allclose(metrics.ssim(images, noisy), metrics.ssim(noisy, images))  # symmetric
    assert (metrics.ssim(images, noisy) < 0.9).all()


def test_a_damaged_classifier_cache_says_to_delete_it(tmp_path):
    path = tmp_path / "checkpoints" / "classifier-mnist.pt"
    path.parent.mkdir()
    path.write_bytes(b"not a checkpoint")
    images, labels = torch.zeros(10, 784), torch.arange(10)
    data = {"train": (images, labels), "test": (images, labels)}
    with pytest.raises(utils.ProjectError, match="classifier-mnist.pt is not a readable checkpoint.*delete it"):
        metrics.scoring_classifier("mnist", data, utils.Phases())
    assert path.read_bytes() == b"not a checkpoint"  # left as it was


class PathDecoder(nn.Module):
    """decode(z) for 1-D codes in [0, 1]: every pixel's intensity 0.2 + 0.6 z (an even walk), or with jump=True
    pixel 0 bright below z = 0.5 and pixel 1 from there on (one step, one change of class)."""
    label_dim = 0  # unconditional

    def __init__(self, jump):
        super().__init__()
        self.jump = jump

    def decode(self, z, labels=None):
        if self.jump:
            images = torch.full((len(z), 784), 0.01)
            images[:, 0] = torch.where(z[:, 0] < 0.5, 0.99, 0.01)
            images[:, 1] = torch.where(z[:, 0] < 0.5, 0.01, 0.99)
        else:
            images = (0.2 + 0.6 * z[:, :1]).expand(-1, 784)
        return torch.logit(images)


class FirstTenPixels(nn.Module):
    """A stand-in classifier: features are the first ten pixels, and the brightest one is the class."""
    head = nn.Identity()

    def features(self, x):
        return 20 * x[:, :10]


@pytest.mark.parametrize("jump, evenness, changes", [(False, 0.0, 0.0), (True, 1 - 1 / 15, 0.0)])
def test_interpolation_quality_known_answers(jump, evenness, changes):
    codes = torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    labels = torch.tensor([0, 1, 2, 3])
    pairs = torch.tensor([[0, 1], [2, 3]])
    scores = metrics.interpolation_quality(PathDecoder(jump), codes, labels, FirstTenPixels(), torch.rand(50, 10),
                                           pairs)
    assert scores["evenness"]["mean"] == pytest.approx(evenness, abs=1e-5)
    assert scores["evenness"]["standard_error"] == pytest.approx(0.0, abs=1e-5)
    assert scores["class_changes_more_than_once"]["mean"] == changes  # a jump changes the class once
    confident = 1.0 if jump else 0.0  # softmax of 20 * (0.99 - 0.01) is sure; an even grey one is not
    assert scores["in_between_confident_share"]["mean"] == confident
    assert math.isfinite(scores["midpoint_frechet_distance"]["mean"])


def test_interpolation_pairs_are_fixed_and_distinct():
    labels = torch.arange(5000) % 10
    pairs = metrics.interpolation_pairs(labels)
    assert pairs.shape == (1000, 2) and torch.equal(pairs, metrics.interpolation_pairs(labels))
    assert (pairs[:, 0] != pairs[:, 1]).all() and len(pairs.flatten().unique()) == 2000


def test_the_iwae_bound_draws_the_same_noise_however_many_batches_a_call_decodes():
    model, x = tiny_vae(), binary_images(n=23)  # a GPU decodes many batches a call, a CPU one
    one = metrics.iwae_nll(model, x, 10, batch_size=3, chunk_size=4, per_call=1)
    for per_call in (2, 5, 100):
        assert metrics.iwae_nll(model, x, 10, batch_size=3, chunk_size=4, per_call=per_call) == \
            pytest.approx(one, rel=1e-6)
    assert metrics.iwae_nll(model, x, 10, batch_size=3, chunk_size=4, seed=1) != pytest.approx(one, rel=1e-6)


def test_float64_work_is_done_on_the_cpu_by_construction():
    """Apple's GPU has no float64: every cast to float64 (`.double()`, `.to(torch.float64)`) is of a tensor
    moved to the CPU (`.cpu()` before it), every float64 tensor made is made on the CPU (no device given), and no
    tensor is made on a device in the dtype its data happens to have (models.label_vectors' float64 mixes)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for name in ("models", "metrics", "plots", "report", "training", "utils", "checkpoint_files", "main"):
        source = (root / f"{name}.py").read_text()
        for node in (node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)):
            arguments = [*node.args, *(keyword.value for keyword in node.keywords)]
            float64 = any(isinstance(argument, ast.Attribute) and argument.attr in ("float64", "double")
                          for argument in arguments)
            cast = isinstance(node.func, ast.Attribute) and (node.func.attr == "double" or
                                                             node.func.attr == "to" and float64)
            if cast:
                assert ".cpu()" in ast.get_source_segment(source, node.func.value), \
                    f"{name}.py:{node.lineno}: a cast to float64 of a tensor not moved to the CPU"
            elif float64:
                assert not any(keyword.arg == "device" for keyword in node.keywords), f"{name}.py:{node.lineno}"
            made_from_data = isinstance(node.func, ast.Attribute) and node.func.attr in ("as_tensor", "tensor")
            if made_from_data and any(keyword.arg == "device" for keyword in node.keywords):
                # its dtype is the data's, float64 for Python floats or a float64 array: name one, or make it on the CPU
                assert any(keyword.arg == "dtype" for keyword in node.keywords), \
                    f"{name}.py:{node.lineno}: a tensor made on a device in the dtype of its data"


def test_a_conditional_models_likelihood_summed_over_labels_is_its_likelihood_where_the_label_is_ignored():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="vae", latent_dim=3, hidden_dim=32, condition="label"))
    with torch.no_grad():  # the label's columns weigh nothing: p(x | y) is the same for every y
        model.encoder[0].weight[:, 784:] = 0
        model.decoder[0].weight[:, 3:] = 0
    x = binary_images(n=12)
    given = metrics.iwae_nll(model, x, 20, torch.arange(12) % 10)
    over_labels = metrics.nll_over_labels(metrics.iwae_log_likelihoods_per_label(model, x, 20))
    assert over_labels == pytest.approx(given, rel=1e-9)


def test_the_conditional_vae_classifies_by_bayes_rule_from_its_ten_bounds():
    log_likelihoods = torch.full((10, 4), -100.0, dtype=torch.float64)
    log_likelihoods[3, 0] = log_likelihoods[7, 1] = log_likelihoods[2, 2] = -90.0  # 3, 7, 2 by e^10
    log_likelihoods[:, 3] = -95.0  # no evidence: p(y | x) = 1/10 each, argmax the first label
    scores = metrics.label_from_likelihoods(log_likelihoods, torch.tensor([3, 7, 5, 0]))
    assert scores["accuracy"] == 0.75  # 3, 7 and the tie's 0 right; 2 for a 5 wrong
    p_right = 1 / (1 + 9 * math.exp(-10))
    expected = (2 * p_right + (1 - p_right) / 9 + 0.1) / 4
    assert scores["mean_probability_of_the_true_label"] == pytest.approx(expected, rel=1e-9)
    given = metrics.iwae_log_likelihoods_per_label(
        build_model(ModelConfig(kind="vae", latent_dim=3, hidden_dim=32, condition="label")), binary_images(n=5), 7)
    assert given.shape == (10, 5) and given.dtype == torch.float64


def test_the_share_of_samples_that_are_the_label_asked_for():
    asked = torch.tensor([0, 0, 1, 1, 2])
    samples = torch.full((5, 784), 0.01)
    samples[torch.arange(5), torch.tensor([0, 3, 1, 1, 2])] = 0.99  # the second sample is a 3
    shares = metrics.asked_for_shares(FirstTenPixels(), samples, asked)
    assert shares["asked_for_share"] == pytest.approx(0.8)
    assert shares["asked_for_share_per_label"]["0"] == 0.5 and shares["asked_for_share_per_label"]["1"] == 1.0
