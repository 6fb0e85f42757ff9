import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint_files
import main
import metrics
import plots
import utils
from conftest import FAST_SCORES, REAL_MNIST, ROOT, make_synthetic_mnist, run_expecting_error
from models import ModelConfig, build_model

FIGURES = ["generation.png", "interpolation.png", "latent_scatter.png", "reconstruction.png", "loss_curves.png",
           "manifold.png", "latent_evolution.gif"]


def flags(data_dir, out, *extra):
    return ["--data-dir", str(data_dir), "--checkpoint-dir", str(out / "checkpoints"),
            "--figure-dir", str(out / "figures"), "--epochs", "1", *FAST_SCORES, *extra]


def test_train_then_eval_writes_every_file_and_eval_reproduces_the_metrics(tmp_path, committed_classifier, capsys,
                                                                          monkeypatch):
    """One short epoch on the real, committed MNIST (synthetic IDX files if it was removed)."""
    real = (REAL_MNIST / "MNIST" / "raw").is_dir()
    data_dir = REAL_MNIST if real else make_synthetic_mnist(tmp_path / "mnist")
    if data_dir == REAL_MNIST:  # the committed classifier is cached for MNIST: no run may train another
        monkeypatch.setattr(metrics, "train_classifier", lambda *a, **k: pytest.fail("trained a second classifier"))
    trained = main.main(flags(data_dir, tmp_path / "run"))
    printed = capsys.readouterr().out
    for phase in ["reading the data", "training", "computing the IWAE bound", "drawing the GIF", "total"]:
        assert f"  {phase} " in printed, printed  # the table of phases
    figure_dir = tmp_path / "run" / "figures"
    for name in FIGURES:
        (figure_dir / name).unlink()  # --eval must write them again
    (figure_dir / "metrics.json").unlink()

    evaluated = main.main(flags(data_dir, tmp_path / "run", "--eval", "--latent-dim", "7"))  # flags must not matter
    for name in FIGURES:
        assert (figure_dir / name).read_bytes()[:6] in (b"\x89PNG\r\n", b"GIF89a"), name
    on_disk = json.loads((figure_dir / "metrics.json").read_text())
    for kind in ["vae", "ae"]:
        assert on_disk[kind]["config"]["latent_dim"] == 20 and on_disk[kind]["epochs"] == 1
        assert on_disk[kind]["test"] == trained[kind]["test"] == evaluated[kind]["test"]
        # one test loss per model and epoch: the epoch line's is the report's (side by side, on other threads)
        last_epoch = checkpoint_files.load_checkpoint(tmp_path / "run" / "checkpoints" / f"{kind}.pt")["history"][-1]["test"]
        assert last_epoch["loss"] == pytest.approx(on_disk[kind]["test"]["loss"], rel=1e-6)
    assert on_disk["vae"]["test_nll_iwae"] == trained["vae"]["test_nll_iwae"] == evaluated["vae"]["test_nll_iwae"]
    assert on_disk["samples"] == trained["samples"] == evaluated["samples"]
    assert set(on_disk["vae"]["test"]) == {"loss", "bce", "kl"}
    assert len(on_disk["samples"]) == 3  # VAE prior, AE prior, AE fitted Gaussian
    if data_dir == REAL_MNIST:  # after one epoch both models are far below the untrained 543 nats
        assert on_disk["vae"]["test"]["loss"] < 140 and on_disk["ae"]["test"]["loss"] < 100
        # the IWAE bound is tighter than the ELBO, and the classifier that scores samples reads digits
        assert on_disk["vae"]["test_nll_iwae"]["nats"] < on_disk["vae"]["test"]["loss"]
        assert on_disk["classifier"]["test_accuracy"] > 0.97


def trained_weights(data_dir, out, *options):
    main.main(flags(data_dir, out, "--models", "vae", "--hidden-dim", "16", "--no-figures", *options))
    return checkpoint_files.load_checkpoint(out / "checkpoints" / "vae.pt")["model"]


def test_same_seed_gives_identical_weights(synthetic_mnist, tmp_path):
    first = trained_weights(synthetic_mnist, tmp_path / "a", "--seed", "3")
    second = trained_weights(synthetic_mnist, tmp_path / "b", "--seed", "3")
    other = trained_weights(synthetic_mnist, tmp_path / "c", "--seed", "4")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_model_trains_beside_the_other_as_alone_on_the_same_threads(synthetic_mnist, tmp_path, precision):
    # Side by side, each model gets half of torch's threads. Alone with that many threads its arithmetic is the same,
    # so its weights must be too: a model drawing from a generator the other also draws from would break this.
    # (With other thread counts matmuls sum in another order: same seed, close but not equal weights.)
    options = ["--hidden-dim", "16", "--binarize", "dynamic", "--epochs", "2", "--precision", precision, "--no-figures"]
    main.main(flags(synthetic_mnist, tmp_path / "both", *options))
    kinds = ["vae", "ae"] if precision == "fp32" else ["vae"]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // 2))
    try:
        for kind in kinds:
            main.main(flags(synthetic_mnist, tmp_path / kind, *options, "--models", kind))
    finally:
        torch.set_num_threads(threads)
    for kind in kinds:
        both = checkpoint_files.load_checkpoint(tmp_path / "both" / "checkpoints" / f"{kind}.pt")
        alone = checkpoint_files.load_checkpoint(tmp_path / kind / "checkpoints" / f"{kind}.pt")
        assert all(torch.equal(both["model"][name], alone["model"][name]) for name in both["model"]), kind
        assert [record["test"] for record in both["history"]] == [record["test"] for record in alone["history"]]


@pytest.mark.parametrize("kind", ["vae", "ae"])
def test_bf16_training_follows_fp32_closely_but_not_bit_for_bit(kind):
    # 40 steps: an autocast around the whole epoch would keep the first step's bfloat16 weights throughout
    images, labels = torch.rand(640, 784, generator=torch.Generator().manual_seed(0)), torch.arange(640) % 10

    def train(precision):
        torch.manual_seed(0)
        model = build_model(ModelConfig(kind=kind, hidden_dim=64))
        optimizer = utils.make_optimizer(model, 3e-3, torch.device("cpu"))
        parts = main.train_epoch(model, optimizer, images, labels, batch_size=16, order=torch.Generator().manual_seed(0),
                                 draws=torch.Generator().manual_seed(0), precision=precision)
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
    path = tmp_path / "ck" / "vae.pt"
    checkpoint_files.save_checkpoint(path, {"config": vars(config), "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "epoch": 3, "history": [
                                     {"epoch": epoch, "train": {"loss": 1.0}, "test": {"loss": 1.0},
                                      "train_seconds": 1.0, "epoch_seconds": 1.0} for epoch in (1, 2, 3)],
                                 "args": {"seed": 0, "models": ["vae"], "device": "auto"}})
    loaded = checkpoint_files.load_checkpoint(path)
    rebuilt = build_model(ModelConfig(**loaded["config"]))
    rebuilt.load_state_dict(loaded["model"])
    x = torch.rand(5, 784)
    assert torch.equal(rebuilt.encode(x), model.encode(x))
    assert loaded["epoch"] == 3 and loaded["optimizer"]["state"][0]["step"] == 1
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


@pytest.mark.parametrize("content, words", [(None, "no checkpoint at"), (b"not a checkpoint", "not a readable")])
def test_eval_with_a_bad_checkpoint_is_one_clear_line(synthetic_mnist, tmp_path, content, words, capsys):
    if content is not None:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "vae.pt").write_bytes(content)
    code, printed = run_expecting_error(flags(synthetic_mnist, tmp_path, "--eval"), capsys)
    assert code == 1 and words in printed


@pytest.mark.parametrize("bad, words", [
    (["--epochs", "0"], "at least 1"), (["--lr", "-1"], "more than 0"), (["--lr", "nan"], "more than 0"),
    (["--beta", "inf"], "more than 0"), (["--batch-size", "x"], "expected an integer"), (["--models", "gan"], "gan"),
    (["--latent-dim", "0"], "at least 1"), (["--hidden-dim", "-3"], "at least 1"),
    (["--quality-samples", "1"], "at least 129"), (["--latent-study", "4", "0"], "at least 1"),
    (["--device", "foo"], "this machine has: cpu"), (["--eval", "--resume"], "exclude each other"),
    (["--binarize", "dynamic", "--adversarial-weight", "1"], "use --binarize none with them"),
    (["--k", "5"], "needs --objective iwae"), (["--k", "0", "--objective", "iwae"], "at least 1"),
    (["--objective", "iwae", "--perceptual-weight", "1"], "use --objective elbo with them"),
])
def test_invalid_flags_exit_with_code_2_and_one_line(bad, words, capsys):
    with pytest.raises(SystemExit) as exited:
        main.parse_args(bad)
    assert exited.value.code == 2
    printed = capsys.readouterr().err.strip()
    assert printed.startswith("error: ") and "\n" not in printed and "--help" in printed
    assert words in printed and (bad[0] in printed or bad[0] == "--eval")


@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
def test_a_device_this_machine_lacks_is_refused_before_any_data_is_read(device, capsys):
    if device in utils.available_devices() or (device == "cuda" and torch.cuda.is_available()):
        pytest.skip(f"this machine has {device}")
    with pytest.raises(SystemExit) as exited:
        main.parse_args(["--device", device, "--data-dir", "no-such-folder"])
    assert exited.value.code == 2
    assert f"there is no device '{device}' here; this machine has: cpu" in capsys.readouterr().err


def test_research_options_are_stored_and_eval_reproduces_them(synthetic_mnist, tmp_path):
    options = ["--models", "vae", "--epochs", "2", "--arch", "conv", "--hidden-dim", "16", "--binarize", "static",
               "--beta", "2", "--kl-warmup", "1", "--lr-schedule", "cosine", "--nll-samples", "10",
               "--condition", "label", "--objective", "iwae", "--k", "3"]
    trained = main.main(flags(synthetic_mnist, tmp_path, *options))
    evaluated = main.main(flags(synthetic_mnist, tmp_path, "--eval", "--nll-samples", "10"))
    vae = evaluated["vae"]
    assert vae["config"]["arch"] == "conv" and vae["config"]["beta"] == 2.0 and vae["binarize"] == "static"
    assert vae["config"]["objective"] == "iwae" and vae["config"]["k"] == 3
    assert vae["test"] == trained["vae"]["test"] and vae["test_nll_iwae"] == trained["vae"]["test_nll_iwae"]
    assert vae["flags"]["lr_schedule"] == "cosine" and vae["flags"]["kl_warmup"] == 1.0
    assert set(evaluated["samples"]) == {"VAE, z ~ N(0, I)"}
    # a conditional run: -log p(x) over the labels beside -log p(x | y), shares of the label asked for, its figures
    assert vae["config"]["condition"] == "label" and vae["test_nll_iwae"]["summed_over_labels"] == 10
    assert vae["test_nll_given_label_iwae"]["nats"] > 0
    assert "A conditional run" in json.loads((tmp_path / "figures" / "metrics.json").read_text())["notes"]
    assert set(evaluated["samples"]["VAE, z ~ N(0, I)"]["asked_for_share_per_label"]) == set("0123456789")
    for name in ("conditional.png", "analogies.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000, name


def test_the_python_api_loads_a_checkpoint_samples_a_label_and_reconstructs(tmp_path):
    from checkpoint_files import load_model

    config = ModelConfig(kind="vae", latent_dim=4, hidden_dim=8, condition="label")
    model = build_model(config)
    checkpoint_files.save_checkpoint(tmp_path / "vae.pt", {"config": vars(config), "model": model.state_dict(),
                                                           "history": []})
    vae = load_model(tmp_path / "vae.pt")  # the README's three lines
    sevens = vae.sample(16, labels=7)
    again = vae.reconstruct(sevens, labels=7)
    assert sevens.shape == again.shape == (16, 784) and 0 <= sevens.min() and sevens.max() <= 1
    assert torch.equal(vae.decoder[0].weight, model.decoder[0].weight) and not vae.training


def test_a_1d_latent_space_trains_and_draws_every_figure(synthetic_mnist, tmp_path):
    metrics = main.main(flags(synthetic_mnist, tmp_path, "--latent-dim", "1", "--hidden-dim", "16"))
    assert metrics["vae"]["config"]["latent_dim"] == 1 and len(metrics["vae"]["posterior"]["kl_per_dimension"]) == 1
    for name in FIGURES:
        assert (tmp_path / "figures" / name).stat().st_size > 1000, name


def test_the_classifier_is_trained_once_per_dataset_whatever_the_folders(synthetic_mnist, tmp_path, monkeypatch):
    main.main(flags(synthetic_mnist, tmp_path / "first", "--dataset", "fashion-mnist", "--hidden-dim", "16",
                    "--no-figures"))
    assert (tmp_path / "checkpoints" / "classifier-fashion-mnist.pt").is_file()  # the cache, in the working folder
    monkeypatch.setattr(metrics, "train_classifier", lambda *a, **k: pytest.fail("trained the classifier again"))
    main.main(flags(synthetic_mnist, tmp_path / "second", "--dataset", "fashion-mnist", "--hidden-dim", "16",
                    "--no-figures"))
    evaluated = main.main(flags(synthetic_mnist, tmp_path / "second", "--eval", "--no-figures"))  # the checkpoints' dataset
    assert evaluated["dataset"] == "fashion-mnist"
    assert evaluated["classifier"]["file"] == "checkpoints/classifier-fashion-mnist.pt"


def test_the_iwae_sample_count_changes_no_other_metric_and_eval_keeps_the_stored_one(synthetic_mnist, tmp_path):
    trained = main.main(flags(synthetic_mnist, tmp_path, "--hidden-dim", "16", "--no-figures"))  # 10 samples
    kept = main.main(["--data-dir", str(synthetic_mnist), "--checkpoint-dir", str(tmp_path / "checkpoints"),
                      "--figure-dir", str(tmp_path / "figures"), "--eval", "--quality-samples", "500",
                      "--no-figures"])
    assert kept == trained  # the count of the metrics.json it replaced: 10
    many = main.main(flags(synthetic_mnist, tmp_path, "--eval", "--nll-samples", "30", "--no-figures"))
    assert kept["vae"].pop("test_nll_iwae") != many["vae"].pop("test_nll_iwae")
    assert kept == many


def test_main_flushes_denormals_in_every_torch_thread(tmp_path):
    """In a fresh process, main() sets the mode before torch starts its threads, so that they
    inherit it: without it Adam's decayed moments made each epoch 10-15% slower."""
    script = ("import sys, torch, main\n"
              "try:\n    main.main(['--eval', '--checkpoint-dir', sys.argv[1]])\n"
              "except SystemExit:\n    pass\n"  # no checkpoints there: an error line, after the flags
              # 2**20 denormals 1.4e-42, made from their bits: a float literal would be flushed here
              "tiny = torch.full((2 ** 20,), 1000, dtype=torch.int32).view(torch.float32)\n"
              "print(torch.get_num_threads(), int((tiny * 2.0).count_nonzero()))")  # split by thread
    ran = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    threads, denormals = map(int, ran.stdout.split())
    assert threads == 2  # the product is split between the main thread and a thread of torch's pool
    assert denormals == 0, f"{denormals} of 2**20 denormals survived on {threads} threads"


def test_principal_axes_have_one_sign_whatever_the_svd_returns():
    codes = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * torch.tensor([5.0, 3, 1, 1, 1, 1])
    axes = plots.principal_axes(codes)
    assert torch.allclose(axes.T @ axes, torch.eye(2), atol=1e-5)
    assert torch.allclose(plots.principal_axes(-codes), axes, atol=1e-5)  # -codes: the same axes, up to sign
    assert (axes.gather(0, axes.abs().argmax(dim=0, keepdim=True)) > 0).all()


def test_the_comparison_figure_puts_five_columns_to_a_row(tmp_path):
    from matplotlib.image import imread
    images = torch.rand(80, 784)
    sizes = []
    for runs in (4, 6):  # with the real images: 5 columns in one row, then 7 in two
        models = {f"run {i}": build_model(ModelConfig(kind="vae", latent_dim=2, hidden_dim=8)) for i in range(runs)}
        plots.plot_comparison(models, (images, torch.arange(80) % 10), tmp_path / f"{runs}.png")
        sizes.append(imread(tmp_path / f"{runs}.png").shape[:2])
    (one_row, width), (two_rows, same_width) = sizes
    assert width == same_width and 1.8 < two_rows / one_row < 2.2, sizes


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


def test_benchmark_times_the_resnet_with_both_extra_terms(synthetic_mnist, capsys):
    import benchmark
    benchmark.main_benchmark(["--data-dir", str(synthetic_mnist), "--device", "cpu", "--repeats", "1",
                              "--models", "vae", "--arch", "resnet", "--hidden-dim", "16",
                              "--perceptual-weight", "1", "--adversarial-weight", "0.5"])
    printed = capsys.readouterr().out
    assert "--arch resnet --hidden-dim 16 --perceptual-weight 1 --adversarial-weight 0.5" in printed
    rows = [line for line in printed.splitlines() if line.startswith("VAE ")]
    assert len(rows) == 1 and "(a) this project" in rows[0], printed  # no tutorial twin, no floor
    model = build_model(ModelConfig(kind="vae", hidden_dim=16))
    objective, discriminator_step = benchmark.with_extra_terms(model, 1.0, 0.5, torch.device("cpu"))
    assert objective.adversarial_on and objective.perceptual is not None  # both terms, from step one
    assert objective.model is model and objective.discriminator is discriminator_step.discriminator
    assert benchmark.with_extra_terms(model, 0.0, 0.0, torch.device("cpu")) == (model, None)


@pytest.mark.parametrize("document", ["README.md", "docs/speed.md", "docs/experiments.md"])
def test_the_line_links_of_the_docs_point_into_the_code_they_name(document):
    import re

    text = (ROOT / document).read_text()
    links = re.findall(r"\[`([\w.]+)`\]\(((?:\.\./)?\w+\.py)#L(\d+)(?:-L(\d+))?\)", text)
    assert len(links) >= (7 if document == "README.md" else 0)
    for name, file, first, last in links:
        lines = (ROOT / document).parent.joinpath(file).resolve().read_text().splitlines()
        opening, closing = lines[int(first) - 1].strip(), lines[int(last or first) - 1].strip()
        where = f"{document}: {name} at {file}#L{first}-L{last}"
        if name.isupper():  # a constant: the line that assigns it
            assert opening.startswith(f"{name} = "), where
            continue
        definitions = [re.match(r"\s*(?:def|class) (\w+)\b", line) for line in lines[:int(first)]]
        enclosing = [match[1] for match in definitions if match][-1]  # the last def at or above L{first}
        assert enclosing == name.split(".")[-1], where
        # the range opens at the def (or at a comment inside it) and ends on code, not a blank line
        assert opening.startswith(("def ", "class ", "#")) and closing, where


@pytest.mark.parametrize("folder, advice", [("empty", "`python main.py --checkpoint-dir empty`"),
                                            ("checkpoints", "`python main.py`,")])
def test_no_checkpoint_advice_trains_into_the_folder_asked_for(tmp_path, capsys, folder, advice):
    (tmp_path / folder).mkdir()
    code, printed = run_expecting_error(["--eval", "--checkpoint-dir", folder], capsys)
    assert code == 1 and f"no checkpoint at {folder}/vae.pt" in printed and advice in printed, printed


def test_each_module_imports_only_the_ones_below_it():
    import ast

    order = ["utils", "models", "checkpoint_files", "training", "metrics", "plots", "run_folders", "report", "main",
             "studies"]
    assert {path.stem for path in ROOT.glob("*.py")} == {*order, "benchmark"}  # a new module takes its place here
    for position, name in enumerate(order):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        above = set(order) if name in ("utils", "models") else set(order[position:])  # both import none of ours
        assert not imported & above, f"{name}.py imports {imported & above}"


def test_a_conditional_run_too_short_to_use_its_label_says_so(synthetic_mnist, tmp_path, capsys):
    scores = main.main(flags(synthetic_mnist, tmp_path, "--epochs", "1", "--condition", "label", "--no-figures"))
    printed = capsys.readouterr().out
    assert scores["samples"]["VAE, z ~ N(0, I)"]["asked_for_share"] < 0.5
    assert "note: after 1 epoch the VAE's decoder barely uses its label" in printed
    assert "as a classifier (the label y of largest p(x | y), by Bayes' rule): right for" in printed
    assert 0 <= scores["vae"]["label_from_likelihoods"]["accuracy"] <= 1
