"""The resnet architecture and the extra training terms: perceptual distance, PatchGAN discriminator,
adaptive weight; the discriminator in the checkpoint; slimmed checkpoints; --compare."""
import math

import pytest
import torch
from torch import nn

import checkpoint_files
import main
import training
from conftest import FAST_SCORES, run_expecting_error
from models import (Discriminator, ModelConfig, PerceptualNet, TrainingObjective, adaptive_weight,
                    build_model)

COMBINATIONS = [(0, 0), (1, 0), (0, 0.5), (1, 0.5)]  # (perceptual weight, adversarial weight)


def objective(kind, arch, perceptual_weight, adversarial_weight):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, latent_dim=3, hidden_dim=32, arch=arch))
    made = TrainingObjective(model=model, perceptual_weight=perceptual_weight, perceptual=PerceptualNet(),
                             adversarial_weight=adversarial_weight, discriminator=Discriminator())
    made.adversarial_on = True
    return made


def batch(n=8, seed=0):
    return torch.rand(n, 784, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weights", COMBINATIONS, ids=["plain", "perceptual", "adversarial", "both"])
@pytest.mark.parametrize("arch", ["mlp", "conv", "resnet"])
@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_every_arch_and_loss_gives_shapes_finite_losses_and_its_own_parts(kind, arch, weights):
    made = objective(kind, arch, *weights)
    x = batch()
    assert made.model.encode(x).shape == (8, 3) and made.model.decode(torch.zeros(5, 3)).shape == (5, 784)
    loss, parts = made(x, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.shape == () and math.isfinite(loss.item())
    named = {"kl": kind == "vae", "perceptual": weights[0] > 0, "adversarial": weights[1] > 0}
    expected = {"bce"} | {part for part, present in named.items() if present}
    assert set(parts) == expected
    assert loss.item() == pytest.approx(sum(part.item() for part in parts.values()), rel=1e-5, abs=1e-4)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in made.model.parameters())
    _, bare_parts = made.model(x, generator=torch.Generator().manual_seed(0))  # the model's own parts, unweighted
    assert bare_parts["bce"].item() == pytest.approx(parts["bce"].item(), rel=1e-6)
    assert made.decoded.shape == (8, 784) and made.decoded.min() >= 0 and made.decoded.max() <= 1


def test_the_resnet_has_no_path_from_encoder_to_decoder_but_the_code():
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="ae", latent_dim=3, hidden_dim=32, arch="resnet"))
    x = batch(2).requires_grad_()
    z = model.encode(x).detach().requires_grad_()
    model.decode(z).sum().backward()
    assert x.grad is None and z.grad.abs().sum() > 0  # the decoder sees z alone
    assert any(isinstance(m, nn.MultiheadAttention) or type(m).__name__ == "SelfAttention"
               for m in model.decoder.modules())


def test_the_discriminator_and_the_model_move_only_through_their_own_losses():
    made = objective("vae", "mlp", 1, 0.5)
    model_optimizer = torch.optim.Adam(made.model.parameters(), lr=1e-2)
    discriminator_step = training.DiscriminatorStep(made.discriminator, 1e-2, torch.device("cpu"))
    x = batch()
    before = {name: p.detach().clone() for name, p in made.discriminator.named_parameters()}
    loss, _ = made(x)
    model_optimizer.zero_grad()
    loss.backward()
    model_optimizer.step()
    assert all(torch.equal(before[name], p) for name, p in made.discriminator.named_parameters())
    model_before = {name: p.detach().clone() for name, p in made.model.named_parameters()}
    grads_before = {name: p.grad.clone() for name, p in made.model.named_parameters()}
    discriminator_step.step(x, made.decoded)
    assert all(torch.equal(model_before[name], p) for name, p in made.model.named_parameters())
    assert all(torch.equal(grads_before[name], p.grad) for name, p in made.model.named_parameters())
    assert not all(torch.equal(before[name], p) for name, p in made.discriminator.named_parameters())
    # and the hinge loss never reaches the decodes it is given: it detaches them
    fake = made.model.decode(torch.zeros(2, 3)).sigmoid()
    made.discriminator.discriminator_loss(x[:2], fake).backward()
    assert all(p.grad is None or torch.equal(grads_before[name], p.grad)
               for name, p in made.model.named_parameters())


def test_the_adaptive_weight_is_the_ratio_of_gradient_norms_clamped_and_detached():
    weight = torch.ones(4, requires_grad=True)
    # d(3 sum w)/dw = 3 (norm 6), d(sum w)/dw = 1 (norm 2)
    assert adaptive_weight(3 * weight.sum(), weight.sum(), weight).item() == pytest.approx(6 / (2 + 1e-4))
    assert adaptive_weight(3 * weight.sum(), 0 * weight.sum(), weight).item() == 1e4  # 6 / 1e-4, clamped
    assert not adaptive_weight(3 * weight.sum(), weight.sum(), weight).requires_grad


def test_the_hinge_loss_and_the_model_term_at_known_logits():
    discriminator = Discriminator()
    discriminator.layers = nn.Identity()  # the "images" are the logits themselves
    real, fake = torch.tensor([[2.0, 0.5]]), torch.tensor([[-3.0, 0.0]])
    # real: relu(1 - 2) = 0, relu(1 - 0.5) = 0.5; fake: relu(1 - 3) = 0, relu(1 + 0) = 1; halved
    assert discriminator.discriminator_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert discriminator.model_loss(fake).item() == pytest.approx(1.5)


def test_the_patch_discriminator_judges_each_patch_by_its_own_pixels():
    torch.manual_seed(0)
    discriminator, images = Discriminator(), batch(2)
    changed = images.clone().view(2, 28, 28)
    changed[:, :6, :6] = 1 - changed[:, :6, :6]  # the top left corner only
    before, after = discriminator(images), discriminator(changed.view(2, 784))
    assert before.shape == (2, 1, 7, 7)  # a logit per patch
    moved = (after - before).abs()[:, 0] > 1e-6  # (2, 7, 7)
    assert moved[:, 0, 0].all() and not moved[:, 4:, :].any() and not moved[:, :, 4:].any()


def run_flags(data_dir, out, epochs, *extra):
    return ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "checkpoints"), "--figure-dir",
            str(out / "figures"), "--epochs", str(epochs), "--hidden-dim", "16", "--models", "vae", *FAST_SCORES,
            "--no-figures",
            "--perceptual-weight", "1", "--adversarial-weight", "0.5", "--adversarial-start", "1", *extra]


def test_resume_with_the_discriminator_on_is_bit_for_bit_and_eval_keeps_the_honest_elbo(
        synthetic_mnist, tmp_path, committed_classifier):
    main.main(run_flags(synthetic_mnist, tmp_path / "straight", 3))
    main.main(run_flags(synthetic_mnist, tmp_path / "resumed", 2))
    main.main(run_flags(synthetic_mnist, tmp_path / "resumed", 3, "--resume"))
    straight, resumed = (checkpoint_files.load_checkpoint(tmp_path / run / "checkpoints" / "vae.pt")
                         for run in ("straight", "resumed"))
    for part in ("model", "discriminator"):
        first, second = (straight[part], resumed[part]) if part == "model" else \
            (straight[part]["model"], resumed[part]["model"])
        assert all(torch.equal(first[name], second[name]) for name in first), part
    history = straight["history"]
    assert "adversarial" not in history[0]["train"] and "adversarial" in history[2]["train"]
    assert set(history[2]["test"]) == {"loss", "bce", "kl"} and history[2]["discriminator_loss"] > 0
    scores = main.main(["--eval", *run_flags(synthetic_mnist, tmp_path / "straight", 3)[:6], *FAST_SCORES,
                        "--no-figures"])
    assert scores["vae"]["flags"]["adversarial_weight"] == 0.5 and "sharpness" in scores["vae"]["reconstruction"]
    assert scores["vae"]["test"]["loss"] == pytest.approx(history[2]["test"]["loss"])


def test_the_perceptual_network_is_never_the_scoring_classifier(synthetic_mnist, tmp_path, committed_classifier):
    main.main(run_flags(synthetic_mnist, tmp_path, 1, "--adversarial-weight", "0"))
    perceptual = checkpoint_files.load_checkpoint(tmp_path / "checkpoints" / "perceptual-mnist.pt")
    scoring = checkpoint_files.load_checkpoint(tmp_path / "checkpoints" / "classifier-mnist.pt")
    assert perceptual["config"]["kind"] == "perceptual" and scoring["config"]["kind"] == "classifier"
    def weight_shapes(state):  # the layers' weights (the ten-class biases share a shape)
        return {tuple(tensor.shape) for tensor in state.values() if tensor.dim() > 1}
    assert not weight_shapes(scoring["model"]) & weight_shapes(perceptual["model"])  # no layer in common


def test_a_slimmed_checkpoint_evaluates_compares_and_refuses_resume_in_one_line(synthetic_mnist, tmp_path,
                                                                             committed_classifier, capsys):
    common = ["--data-dir", str(synthetic_mnist), *FAST_SCORES]
    main.main([*common, "--epochs", "1", "--hidden-dim", "16", "--no-figures"])  # the reference pair
    run = run_flags(synthetic_mnist, tmp_path, 2, "--arch", "resnet")
    run[3], run[5] = "checkpoints/comparison/gan", "figures/comparison/gan"
    main.main(run)
    main.main(["--eval", "--slim", *run[:6], *FAST_SCORES, "--no-figures"])
    slim = checkpoint_files.load_checkpoint(tmp_path / "checkpoints/comparison/gan/vae.pt")
    assert "optimizer" not in slim and "discriminator" not in slim
    assert slim["history"] and not any("codes" in record for record in slim["history"])  # no GIF to draw
    code, printed = run_expecting_error([*run, "--epochs", "3", "--resume"], capsys)
    assert code == 2 and "slimmed" in printed
    table = main.main([*common, "--compare"])
    assert list(table) == ["VAE (reference)", "AE (reference)", "gan"]
    assert table["gan"]["arch"] == "resnet" and 0 < table["gan"]["sample_sharpness"]
    assert (tmp_path / "figures/comparison/comparison.png").is_file()
    assert "| gan |" in capsys.readouterr().out
