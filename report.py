"""What a run writes once its models are trained or read: their scores (metrics.py) in metrics.json,
every figure (plots.py), and the summary it prints; and the reports over several run folders:
the latent-size study's table (for studies.py), --compare's figure and table, and --slim's
checkpoints, cut to what --eval reads. Trains nothing."""
import contextlib
import json
from pathlib import Path

import torch

import checkpoint_files
import metrics
import plots
import utils
from checkpoint_files import TRAINING_FLAGS
from models import MODEL_NAMES, NUM_CLASSES

DEFAULT_NLL_SAMPLES = 100


def report(saved, data, dataset, run_args, phases):
    """Score each model ({kind: checkpoint_files.SavedModel}, trained or read, on the data's
    device), write metrics.json and every figure into run_args.figure_dir; return the metrics."""
    models = {MODEL_NAMES[kind]: model.model for kind, model in saved.items()}
    scores, codes, samplers = score(saved, models, data, dataset, run_args, phases)
    conditional = any(model.label_dim for model in models.values())
    utils.save_json(Path(run_args.figure_dir) / "metrics.json", {
        **scores, "notes": metrics.METRICS_NOTES + metrics.CONDITIONAL_NOTES * conditional})
    histories = {MODEL_NAMES[kind]: model.checkpoint["history"] for kind, model in saved.items()}
    configs = {MODEL_NAMES[kind]: model.config for kind, model in saved.items()}
    if run_args.figures:
        plots.draw_figures(models, configs, codes, samplers, histories, scores, data, dataset,
                           run_args.figure_dir, phases)
    return scores


def score(saved, models, data, dataset, run_args, phases):
    """metrics.json's numbers, with what the figures reuse: each model's test codes and the
    samplers."""
    (train_images, _), (test_images, test_labels) = data["train"], data["test"]
    classifier, accuracy = metrics.scoring_classifier(dataset, data, phases)
    nll_samples = nll_samples_for(run_args)
    iwae = f"the IWAE bound ({utils.counted(nll_samples, 'sample')}), " if "VAE" in models else ""
    print(f"scoring {' and '.join(models)}: losses, codes, reconstructions, {iwae}samples ...")
    scores = {"dataset": dataset, "quality_samples": run_args.quality_samples, "classifier": {
        "file": str(metrics.classifier_path(dataset)), "test_accuracy": accuracy}}
    codes = {}
    for kind, model in saved.items():
        name, binarize = MODEL_NAMES[kind], model.flags["binarize"]
        model_scores, codes[name] = metrics.score_model(models[name], binarize, data, phases)
        epochs = utils.counted(len(model.checkpoint["history"]), "epoch")
        metrics.require_finite(codes[name], f"the {name}'s codes of the test set",
                               f", after {epochs} in {run_args.checkpoint_dir}/")
        scores[kind] = {**model_scores, "binarize": binarize,
                        **training_record(model, len(train_images))}
    if "vae" in saved:
        with phases("computing the IWAE bound"):
            targets = utils.binarized(test_images, scores["vae"]["binarize"], "test")
            scores["vae"].update(iwae_scores(models["VAE"], targets, test_labels, nll_samples))
    with phases("scoring samples"):
        samplers = metrics.make_samplers(models, data["train"])
        reference, _ = metrics.classify(classifier, test_images)  # (N, 128) features
        scores["samples"] = metrics.score_samples(samplers, classifier, test_images, reference,
                                                  run_args.quality_samples)
    with phases("scoring interpolations"):
        pairs = metrics.interpolation_pairs(test_labels)
        scores["interpolation"] = {
            name: metrics.interpolation_quality(model, codes[name], test_labels, classifier,
                                                reference, pairs)
            for name, model in models.items()}
    return scores, codes, samplers


def iwae_scores(vae, targets, labels, count):
    """The VAE's IWAE bound on -log p(x) with `count` importance samples; a conditional VAE's
    summed over the labels (`count` samples each), and its -log p(x | y) given each image's
    label too."""
    if not vae.label_dim:
        return {"test_nll_iwae": {"nats": metrics.iwae_nll(vae, targets, count, progress=True),
                                  "samples": count}}
    log_likelihoods = metrics.iwae_log_likelihoods_per_label(vae, targets, count, progress=True)
    given = log_likelihoods[labels.cpu(), torch.arange(len(labels))]  # log p(x | its own label)
    return {"test_nll_iwae": {"nats": metrics.nll_over_labels(log_likelihoods),
                              "samples": count, "summed_over_labels": NUM_CLASSES},
            "test_nll_given_label_iwae": {"nats": -given.mean().item(), "samples": count},
            "label_from_likelihoods": metrics.label_from_likelihoods(log_likelihoods, labels)}


def training_record(saved, num_train_images):
    """What metrics.json says of a model's training, from its checkpoint."""
    checkpoint = saved.checkpoint
    history = checkpoint["history"]
    train_seconds = sum(record["train_seconds"] for record in history)
    return {
        "epochs": len(history),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / len(history), 3),
        "images_per_second": round(num_train_images * len(history) / train_seconds),
        "wall_seconds": round(sum(record["epoch_seconds"] for record in history), 2),
        "trained_on": checkpoint.get("device", "an unknown device"),
        "threads": checkpoint.get("threads"),
        "config": checkpoint["config"],
        "flags": {flag: saved.flags[flag] for flag in TRAINING_FLAGS},
    }


def nll_samples_for(run_args):
    """--nll-samples; else with --eval the count of the metrics.json it replaces, so that --eval
    reproduces that file; else the default."""
    if run_args.nll_samples:
        return run_args.nll_samples
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if run_args.eval:
            stored = json.loads((Path(run_args.figure_dir) / "metrics.json").read_text())
            samples = stored["vae"]["test_nll_iwae"]["samples"]
            if isinstance(samples, int) and not isinstance(samples, bool) and samples >= 1:
                return samples
    return DEFAULT_NLL_SAMPLES


def print_summary(scores, run_args):
    """The numbers of this evaluation, a line per model and sampler; then the training speed,
    labelled as the checkpoint's when --eval only read it."""
    for kind in run_args.models:
        m = scores[kind]
        iwae, given = m.get("test_nll_iwae"), m.get("test_nll_given_label_iwae")
        nll = "" if not iwae else f", IWAE bound {iwae['nats']:.2f} (k={iwae['samples']})" \
            if not given else (f", IWAE bound on -log p(x) {iwae['nats']:.2f} ({iwae['samples']} "
                               f"samples for each of the 10 labels), on -log p(x | y) given its "
                               f"own label {given['nats']:.2f}")
        codes_kl = m["latent"]["aggregate_codes"]["gaussian_kl_to_prior"]
        print(f"{MODEL_NAMES[kind]}: test loss {m['test']['loss']:.2f} nats/image{nll}, "
              f"PSNR {m['reconstruction']['psnr']:.2f} dB, codes' KL to N(0, I) {codes_kl:.2f} "
              f"nats")
        if "label_from_likelihoods" in m:
            print(f"{MODEL_NAMES[kind]} as a classifier (the label y of largest p(x | y), by Bayes' "
                  f"rule): right for {percent(m['label_from_likelihoods']['accuracy'])} of the "
                  "test images")
    for label, sample_scores in scores["samples"].items():
        print_sample_scores(label, sample_scores, scores)
    for name, paths in scores["interpolation"].items():
        print(f"interpolation {name}: midpoints' Frechet distance "
              f"{paths['midpoint_frechet_distance']['mean']:.1f}, "
              f"{100 * paths['in_between_confident_share']['mean']:.1f}% of frames confident, "
              f"evenness {paths['evenness']['mean']:.3f}, "
              f"{percent(paths['class_changes_more_than_once']['mean'])} of the paths between "
              "two digits change class more than once")
    for kind in run_args.models:
        m = scores[kind]
        how = f"{m['images_per_second']} images/s on {m['trained_on']}"
        how += f", {utils.counted(m['threads'], 'thread')}" if m.get("threads") else ""
        how += ", bf16" if m["flags"]["precision"] == "bf16" else ""
        whose = "its checkpoint's training" if run_args.eval else "training"
        print(f"{MODEL_NAMES[kind]}: {whose}: {utils.counted(m['epochs'], 'epoch')}, "
              f"{m['seconds_per_epoch']:.2f} s/epoch ({how})")
    print(f"{'figures and ' * run_args.figures}metrics.json written to {run_args.figure_dir}/")


UNUSED_LABEL_SHARE = 0.5  # below it, a conditional run's samples show the label barely used


def print_sample_scores(label, sample_scores, scores):
    """A sampler's line; for a conditional VAE that barely uses its label yet, a note saying so."""
    asked = sample_scores.get("asked_for_share")
    asked_text = "" if asked is None else f", {100 * asked:.1f}% the label asked for"
    print(f"samples {label}: Frechet distance {sample_scores['frechet_distance']:.1f}, "
          f"{100 * sample_scores['confident_share']:.1f}% confident, class entropy "
          f"{sample_scores['class_entropy_bits']:.2f} bits{asked_text}")
    if asked is not None and asked < UNUSED_LABEL_SHARE and label.startswith("VAE"):
        # the VAE's decoder learns to lean on its label (the AE's hardly does, however long)
        print(f"note: after {utils.counted(scores['vae']['epochs'], 'epoch')} the VAE's decoder "
              f"barely uses its label ({100 * asked:.0f}% of samples are the digit asked for, "
              "10% by chance): train longer (the committed conditional run: 30 epochs)")


def percent(share):
    """A share as "12.3%"; "no" where none could be computed (a test set of a few images)."""
    return "no" if share is None else f"{100 * share:.1f}%"


# ------------------------------------------------------------- reports over several run folders

def write_study(figure_dir, results, *, figures=True):
    """The latent-size study (studies.py latent): the scores of each latent size ({size: the
    run's metrics}), as a table, a figure and JSON in figure_dir."""
    study = {str(size): metrics.study_row(scores) for size, scores in results.items()}
    utils.save_json(Path(figure_dir) / "latent_study.json", study)
    if figures:
        plots.plot_latent_study(study, Path(figure_dir) / "latent_study.png")
    print(metrics.latent_study_table(study))
    print(f"{'latent_study.png and ' * figures}latent_study.json written to {figure_dir}/")
    return study


def slim_checkpoints(saved):
    """--slim: rewrite each checkpoint with only what --eval reads for the scores and the still
    figures, to commit it: no Adam state, no discriminator, no test codes per epoch (so --eval
    then draws no latent_evolution.gif)."""
    for model in saved.values():
        checkpoint = {key: value for key, value in model.checkpoint.items()
                      if key not in ("optimizer", *checkpoint_files.DISCRIMINATOR_KEYS)}
        checkpoint["history"] = [{key: value for key, value in record.items() if key != "codes"}
                                 for record in checkpoint["history"]]
        checkpoint_files.save_checkpoint(model.path, checkpoint)
        print(f"{model.path} slimmed to what --eval reads "
              f"({model.path.stat().st_size / 2**20:.1f} MiB); --resume can no longer continue it")


def comparison_runs(args):
    """[(label, kind, checkpoint path, metrics.json path)]: the reference VAE and AE, then each
    run under CHECKPOINT_DIR/comparison/, by name."""
    runs = [(f"{MODEL_NAMES[kind]} (reference)", kind,
             checkpoint_files.checkpoint_path(args.checkpoint_dir, kind),
             Path(args.figure_dir) / "metrics.json") for kind in MODEL_NAMES]
    folder = Path(args.checkpoint_dir) / "comparison"
    for run_dir in sorted(folder.glob("*/")) if folder.is_dir() else []:
        for kind in MODEL_NAMES:
            if utils.is_file(checkpoint_files.checkpoint_path(run_dir, kind)):
                runs.append((run_dir.name if kind == "vae" else f"{run_dir.name} {kind.upper()}",
                             kind, checkpoint_files.checkpoint_path(run_dir, kind),
                             Path(args.figure_dir) / "comparison" / run_dir.name / "metrics.json"))
    return runs


def compare_runs(args, phases, parser):
    """--compare: each run's scores from its metrics.json and its model from its checkpoint, all
    checked, and the runs refused where their numbers do not compare; then the figure of samples
    and reconstructions and the table (printed and written as JSON)."""
    runs, table, bases = comparison_runs(args), {}, {}
    for label, kind, path, metrics_path in runs:
        scores = utils.load_json(metrics_path)
        fix = (f"rewrite it with python main.py --eval --checkpoint-dir {path.parent} "
               f"--figure-dir {metrics_path.parent}")
        table[label] = metrics.comparison_row(scores, kind, metrics_path, fix)
        bases[metrics_path] = metrics.comparison_basis(scores, kind, metrics_path, fix)
    dataset = same_basis(bases)
    printed = metrics.comparison_table(table)
    with phases("loading the checkpoints"):
        models = {label: checkpoint_files.read_saved_model(path, kind, parser).model
                  for label, kind, path, _ in runs}
    with phases("reading the data"):
        data = utils.load_data(args.data_dir, dataset, torch.device("cpu"))
    folder = Path(args.figure_dir) / "comparison"
    with phases("drawing the figures"):
        plots.plot_comparison(models, data["test"], folder / "comparison.png")
    utils.save_json(folder / "comparison.json", table)
    print(printed)
    print(f"comparison.png and comparison.json written to {folder}/")
    return table


def same_basis(bases):
    """The dataset of runs whose numbers compare ({metrics.json path: comparison_basis}); one line
    naming two files where a dataset or a flag that changes the numbers differs."""
    for field in next(iter(bases.values())):
        seen = {}  # value -> the first file with it
        for path, basis in bases.items():
            if basis[field] is not None:
                seen.setdefault(basis[field], path)
        if len(seen) > 1:
            (first, first_path), (other, other_path) = list(seen.items())[:2]
            raise utils.ProjectError(f"--compare: {first_path} was scored with {field} {first}, "
                                     f"{other_path} with {other}: their numbers do not compare; "
                                     f"compare runs of one {field}")
    return next(iter(bases.values()))["dataset"]
