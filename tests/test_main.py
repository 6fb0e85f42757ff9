import json
import shutil

import pytest
import torch

import main
import utils
from conftest import COMMITTED_CLASSIFIER, FAST_SCORES, REAL_MNIST, make_synthetic_mnist, run_expecting_error
from models import ModelConfig, build_model

FIGURES = ["generation.png", "interpolation.png", "latent_scatter.png", "reconstruction.png", "loss_curves.png",
           "manifold.png", "latent_evolution.gif"]


def flags(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "checkpoints"),
            "--figure-dir", str(out / "figures"), "--epochs", "1", *FAST_SCORES, *extra]


def test_train_then_eval_writes_every_file_and_eval_reproduces_the_metrics(tmp_path):
    """One short epoch on the real MNIST when ../shared has it (synthetic IDX files otherwise)."""
    data_dir = REAL_MNIST if REAL_MNIST.is_dir() else make_synthetic_mnist(tmp_path / "mnist")
    if data_dir == REAL_MNIST and COMMITTED_CLASSIFIER.is_file():  # its cache: training it would take a minute
        (tmp_path / "checkpoints").mkdir()
        shutil.copy(COMMITTED_CLASSIFIER, tmp_path / "checkpoints" / "classifier-mnist.pt")
    trained = main.main(flags(data_dir, tmp_path))
    for name in ["vae.pt", "ae.pt"]:
        assert (tmp_path / "checkpoints" / name).is_file()
    figure_dir = tmp_path / "figures"
    for name in FIGURES:
        (figure_dir / name).unlink()  # --eval must write them again
    (figure_dir / "metrics.json").unlink()

    evaluated = main.main(flags(data_dir, tmp_path, "--eval", "--latent-dim", "7"))  # flags must not matter
    for name in FIGURES:
        assert (figure_dir / name).read_bytes()[:6] in (b"\x89PNG\r\n", b"GIF89a"), name
    on_disk = json.loads((figure_dir / "metrics.json").read_text())
    for kind in ["vae", "ae"]:
        assert on_disk[kind]["config"]["latent_dim"] == 20
        assert on_disk[kind]["epochs"] == 1
        assert on_disk[kind]["test"] == trained[kind]["test"] == evaluated[kind]["test"]
    assert on_disk["vae"]["test_nll_iwae"] == trained["vae"]["test_nll_iwae"] == evaluated["vae"]["test_nll_iwae"]
    assert on_disk["samples"] == trained["samples"] == evaluated["samples"]
    assert set(on_disk["vae"]["test"]) == {"loss", "bce", "kl"}
    assert len(on_disk["samples"]) == 3  # VAE prior, AE prior, AE fitted Gaussian
    if data_dir == REAL_MNIST:  # after one epoch both models are far below the untrained 543 nats
        assert on_disk["vae"]["test"]["loss"] < 140 and on_disk["ae"]["test"]["loss"] < 100
        # the IWAE bound is tighter than the ELBO, and the classifier that scores samples reads digits
        assert on_disk["vae"]["test_nll_iwae"]["nats"] < on_disk["vae"]["test"]["loss"]
        assert on_disk["classifier"]["test_accuracy"] > 0.97


def trained_weights(data_dir, out, seed):
    main.main(flags(data_dir, out, "--seed", str(seed), "--models", "vae", "--hidden-dim", "16"))
    return utils.load_checkpoint(out / "checkpoints" / "vae.pt")["model"]


def test_same_seed_gives_identical_weights(synthetic_mnist, tmp_path):
    first = trained_weights(synthetic_mnist, tmp_path / "a", seed=3)
    second = trained_weights(synthetic_mnist, tmp_path / "b", seed=3)
    other = trained_weights(synthetic_mnist, tmp_path / "c", seed=4)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


@pytest.mark.parametrize("kind, precision", [("vae", "fp32"), ("ae", "fp32"), ("vae", "bf16")])
def test_one_model_alone_trains_exactly_as_beside_the_other(synthetic_mnist, tmp_path, kind, precision):
    # on the CPU the two train at the same time: each must draw its z and binarized pixels from its own generator
    options = ["--hidden-dim", "16", "--binarize", "dynamic", "--epochs", "2", "--precision", precision]
    main.main(flags(synthetic_mnist, tmp_path / "both", *options))
    main.main(flags(synthetic_mnist, tmp_path / kind, *options, "--models", kind))
    both = utils.load_checkpoint(tmp_path / "both" / "checkpoints" / f"{kind}.pt")
    alone = utils.load_checkpoint(tmp_path / kind / "checkpoints" / f"{kind}.pt")
    assert all(torch.equal(both["model"][name], alone["model"][name]) for name in both["model"])
    assert [record["test"] for record in both["history"]] == [record["test"] for record in alone["history"]]


@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_bf16_training_follows_fp32_closely_but_not_bit_for_bit(kind):
    # 40 steps: an autocast around the whole epoch would keep the first step's bfloat16 weights throughout
    images = torch.rand(640, 784, generator=torch.Generator().manual_seed(0))

    def train(precision):
        torch.manual_seed(0)
        model = build_model(ModelConfig(kind=kind, hidden_dim=64))
        optimizer = main.make_optimizer(model, 3e-3, torch.device("cpu"))
        parts = main.train_epoch(model, optimizer, images, batch_size=16, shuffle=torch.Generator().manual_seed(0),
                                 description="", noise=torch.Generator().manual_seed(0), precision=precision)
        return parts["loss"], torch.cat([p.flatten() for p in model.parameters()])
    (loss_fp32, weights_fp32), (loss_bf16, weights_bf16) = train("fp32"), train("bf16")
    assert weights_bf16.dtype == torch.float32 and not torch.equal(weights_bf16, weights_fp32)
    assert abs(loss_bf16 - loss_fp32) < 0.002 * loss_fp32, (loss_bf16, loss_fp32)


def test_checkpoint_round_trip_rebuilds_the_same_model(tmp_path):
    config = ModelConfig(kind="vae", latent_dim=4, hidden_dim=8)
    model = build_model(config)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 784))[0].backward()
    optimizer.step()
    path = tmp_path / "vae.pt"
    utils.save_checkpoint(path, {"config": vars(config), "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "epoch": 3, "history": [{"epoch": 3}],
                                 "args": {"seed": 0, "models": ["vae"], "device": "auto"}})
    loaded = utils.load_checkpoint(path)
    rebuilt = build_model(ModelConfig(**loaded["config"]))
    rebuilt.load_state_dict(loaded["model"])
    x = torch.rand(5, 784)
    assert torch.equal(rebuilt.encode(x), model.encode(x))
    assert loaded["epoch"] == 3 and loaded["optimizer"]["state"][0]["step"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ae.pt"
    utils.save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(3)}, "history": []})

    def crash_half_way(obj, file):
        with open(file, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError):
        utils.save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(3)}, "history": []})
    assert torch.equal(utils.load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("content, words", [(None, "no checkpoint at"), (b"not a checkpoint", "not a readable")])
def test_eval_with_a_bad_checkpoint_is_one_clear_line(synthetic_mnist, tmp_path, content, words, capsys):
    if content is not None:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "vae.pt").write_bytes(content)
    code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, "--eval"), capsys)
    assert code == 1 and words in printed


@pytest.mark.parametrize("bad", [["--epochs", "0"], ["--lr", "-1"], ["--batch-size", "x"], ["--models", "gan"],
                                 ["--latent-dim", "0"], ["--hidden-dim", "-3"], ["--eval", "--resume"]])
def test_invalid_flags_exit_with_code_2_and_one_line(bad, capsys):
    with pytest.raises(SystemExit) as exited:
        main.parse_args(bad)
    assert exited.value.code == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("error: ") and "\n" not in printed and "--help" in printed
    assert bad[-2 if bad[0] != "--eval" else 0] in printed


def test_research_options_are_stored_and_eval_reproduces_them(synthetic_mnist, tmp_path):
    options = ["--models", "vae", "--epochs", "2", "--arch", "conv", "--hidden-dim", "16", "--binarize", "static",
               "--beta", "2", "--kl-warmup", "1", "--lr-schedule", "cosine", "--nll-samples", "10"]
    trained = main.main(flags(synthetic_mnist, tmp_path, *options))
    evaluated = main.main(flags(synthetic_mnist, tmp_path, "--eval", "--nll-samples", "10"))
    vae = evaluated["vae"]
    assert vae["config"]["arch"] == "conv" and vae["config"]["beta"] == 2.0 and vae["binarize"] == "static"
    assert vae["test"] == trained["vae"]["test"] and vae["test_nll_iwae"] == trained["vae"]["test_nll_iwae"]
    assert vae["flags"]["lr_schedule"] == "cosine" and vae["flags"]["kl_warmup"] == 1.0
    assert set(evaluated["samples"]) == {"VAE, z ~ N(0, I)"}


def test_fashion_mnist_run_and_eval_follow_the_checkpoints_dataset(synthetic_mnist, tmp_path):
    main.main(flags(synthetic_mnist, tmp_path, "--dataset", "fashion-mnist", "--hidden-dim", "16"))
    assert (tmp_path / "checkpoints" / "classifier-fashion-mnist.pt").is_file()
    evaluated = main.main(flags(synthetic_mnist, tmp_path, "--eval"))  # no --dataset: the checkpoints say which
    assert evaluated["dataset"] == "fashion-mnist"


def test_latent_study_keeps_each_run_apart_and_compares_them(synthetic_mnist, tmp_path):
    from PIL import Image

    study_flags = flags(synthetic_mnist, tmp_path, "--hidden-dim", "16", "--epochs", "2", "--latent-study", "2", "3")
    trained = main.main(study_flags)
    for size in (2, 3):
        checkpoint = utils.load_checkpoint(tmp_path / "checkpoints" / f"latent-{size}" / "vae.pt")
        assert checkpoint["config"]["latent_dim"] == size
        assert (tmp_path / "figures" / f"latent-{size}" / "metrics.json").is_file()
        with Image.open(tmp_path / "figures" / f"latent-{size}" / "latent_evolution.gif") as gif:
            assert gif.n_frames == 2  # one frame per epoch
    assert set(trained) == {"2", "3"} and set(trained["2"]) == {"vae", "ae"}
    assert {"mse", "psnr", "ssim", "test_loss", "test_nll_iwae"} <= set(trained["2"]["vae"])
    assert (tmp_path / "figures" / "latent_study.png").is_file()
    (tmp_path / "figures" / "latent_study.json").unlink()
    evaluated = main.main([*study_flags, "--eval"])
    assert evaluated == trained == json.loads((tmp_path / "figures" / "latent_study.json").read_text())


def test_the_iwae_sample_count_changes_no_other_metric(synthetic_mnist, tmp_path):
    main.main(flags(synthetic_mnist, tmp_path, "--hidden-dim", "16"))
    few = main.main(flags(synthetic_mnist, tmp_path, "--eval", "--nll-samples", "3"))
    many = main.main(flags(synthetic_mnist, tmp_path, "--eval", "--nll-samples", "30"))
    assert few["vae"].pop("test_nll_iwae") != many["vae"].pop("test_nll_iwae")
    assert few == many


def test_benchmark_times_every_method_and_prints_the_ratios(synthetic_mnist, capsys):
    import benchmark
    benchmark.main_benchmark(["--data-dir", str(synthetic_mnist), "--device", "cpu", "--repeats", "1"])
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.startswith(("VAE ", "AE ", "VAE+AE "))]
    for method in ["(a) this project", "(b) tutorial", "(c) compute floor"]:
        assert sum(method in row for row in rows) == 2, printed
    assert sum("(a) side by side" in row for row in rows) == 1
    ratios = [line for line in rows if "(b)/(a) = " in line and "(a)/(c) = " in line]
    assert len(ratios) == 3, printed
