"""Checkpoint files: where they live, how they are written and read, the checks of what one holds,
read as data and never trusted as code (a config of known fields and types, weights of the right
shapes, a history of epochs 1, 2, ..., training flags the command line would take), and the model
rebuilt from one: `load_model(path)` for a learner's shell, `read_saved_model` for a run. Trains,
scores and draws nothing."""
import argparse
import dataclasses
import math
import re
from pathlib import Path

import torch

from models import MODEL_NAMES, ModelConfig, build_model
from utils import ProjectError, first_line, pick_device, write_atomically


MODEL_FLAGS = [field.name for field in dataclasses.fields(ModelConfig)  # the fields a flag sets
               if field.name not in ("kind", "image_dim")]
OBJECTIVE_FLAGS = ["perceptual_weight", "adversarial_weight", "adversarial_start"]
# the flags a checkpoint goes on training with, whatever --resume says; metrics.json's "flags"
DISCRIMINATOR_KEYS = ("discriminator", "adversary")  # where a checkpoint keeps it; its older name
TRAINING_FLAGS = ["batch_size", "lr", "seed", "binarize", "kl_warmup", "lr_schedule", "precision",
                  *OBJECTIVE_FLAGS]


def load_model(path, device="cpu"):
    """The model a checkpoint file holds, rebuilt from its config and checked, in eval mode:

        from checkpoint_files import load_model
        vae = load_model("checkpoints/vae.pt")
        digits = vae.sample(16)  # (16, 784) in [0, 1]

    A device this machine lacks, or arguments of sample and reconstruct that do not fit the
    model, are a ValueError that names the argument; a file that is no usable checkpoint is a
    utils.ProjectError. Both are raised before any work.
    """
    try:
        device = pick_device(str(device))
    except ProjectError as error:
        raise ValueError(f"device: {error}") from None
    path = Path(path)
    config, model = restore_model(load_checkpoint(path), path)
    return model.to(device).eval()


@dataclasses.dataclass
class SavedModel:
    """A model as its checkpoint holds it, read and rebuilt once per run, on the CPU."""
    kind: str  # "vae" or "ae"
    path: Path
    checkpoint: dict  # as load_checkpoint checked it
    config: ModelConfig
    model: torch.nn.Module
    flags: dict  # the flags it trained with; one added to the project since, at its default


def read_saved_model(path, kind, parser):
    """The checkpoint at `path` of the model `kind`, each part checked: the file, its config and
    weights, and its stored flags as `parser` (main.py's) checks the command line's."""
    checkpoint = load_checkpoint(path)
    flags = stored_flags(checkpoint, path, parser)
    if not checkpoint["history"]:
        raise ProjectError(f"{path}: holds no trained epoch; the file is damaged or from another "
                           "version: retrain, or restore it")
    config, model = restore_model(checkpoint, path, kind, parser)
    return SavedModel(kind, Path(path), checkpoint, config, model, flags)


def restore_model(checkpoint, path, kind=None, parser=None):
    """Rebuild the model a checked checkpoint (read from `path`) holds, from its own config, each
    part checked as data first (the config as `parser` checks the model flags); (config, model)."""
    config = dataclass_from(ModelConfig, checkpoint["config"], path, parser,
                            choices={"kind": list(MODEL_NAMES)})
    if kind is not None and config.kind != kind:
        raise ProjectError(f"{path} holds the {config.kind.upper()} model, not the {kind.upper()}; "
                           f"restore the right file or retrain with --models {kind}")
    try:
        model = build_model(config)
    except (RuntimeError, ValueError) as error:  # sizes no layer can have
        raise ProjectError(f"{path}: its config builds no model ({first_line(error, 80)}); the "
                           "file is damaged: retrain") from None
    problem = state_dict_problem(checkpoint["model"], model.state_dict())
    if problem is None and any("codes" in record and record["codes"].shape[1] != config.latent_dim
                               for record in checkpoint["history"]):
        problem = f"its history holds codes that are not {config.latent_dim}-D"
    if problem:
        raise ProjectError(f"{path}: {problem}; the file is damaged or from another version: "
                           "retrain, or restore it")
    model.load_state_dict(checkpoint["model"])
    return config, model


def checkpoint_path(checkpoint_dir, kind):
    return Path(checkpoint_dir) / f"{kind}.pt"


def save_checkpoint(path, checkpoint):
    write_atomically(path, lambda file: torch.save(checkpoint, file))


def load_checkpoint(path, *, fix="retrain or restore it"):
    """Load a checkpoint dict. weights_only=True loads tensors and plain data only, so a file
    from elsewhere cannot run code. `fix` ends the message about a file that is unusable."""
    path = Path(path)
    if not path.is_file():
        folder = "" if path.parent == Path("checkpoints") else f" --checkpoint-dir {path.parent}"
        raise ProjectError(f"no checkpoint at {path}; train one there first with `python main.py"
                           f"{folder}`, or point --checkpoint-dir at a folder that has one")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        code = re.search(r"GLOBAL (\S+)", str(error))
        if code:  # a pickle that would import and call something while it is loaded
            raise ProjectError(f"{path} was refused: loading it would call {code.group(1)}, and "
                               f"only tensors and plain data are loaded; {fix}") from None
        raise ProjectError(f"{path} is not a readable checkpoint ({first_line(error, 80)}); "
                           f"{fix}") from None
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise ProjectError(f"{path} {problem}; {fix}")
    return checkpoint


def checkpoint_problem(checkpoint):
    """What makes a loaded checkpoint unusable, in a few words (None: nothing). Checks its shape
    as data: the config and weights as dicts, the history as epochs 1, 2, ... of finite numbers.
    What the config and the weights must hold is checked where the model is rebuilt."""
    if not isinstance(checkpoint, dict) or not {"config", "model", "history"} <= checkpoint.keys():
        return "is not a checkpoint of this project"
    if not isinstance(checkpoint["config"], dict) or not isinstance(checkpoint["model"], dict):
        return "is not a checkpoint of this project (its config or weights are not a dict)"
    history = checkpoint["history"]
    if not isinstance(history, list) or not all(isinstance(record, dict) for record in history):
        return "has a damaged history (not a list of epochs)"
    epochs = [record.get("epoch") for record in history]
    if [type(epoch) for epoch in epochs] != [int] * len(epochs) \
            or epochs != list(range(1, len(history) + 1)):
        return f"has a damaged history: its epochs are {brief(epochs)}, not 1 to {len(history)}"
    for record in history:
        problem = epoch_record_problem(record)
        if problem:
            return f"has a damaged history: epoch {record['epoch']} {problem}"
    if "epoch" in checkpoint and not (isinstance(checkpoint["epoch"], int)
                                      and checkpoint["epoch"] == len(history)):
        return (f"says it holds epoch {brief(checkpoint['epoch'])} but its history has "
                f"{len(history)}")
    if not isinstance(checkpoint.get("device", ""), str):
        return f"names its device {brief(checkpoint['device'])}, not a device's name"
    threads = checkpoint.get("threads")
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        return f"says it trained on {brief(threads)} threads"
    return None


def epoch_record_problem(record):
    """What is wrong with one epoch of a history, or None."""
    for split in ("train", "test"):
        losses = record.get(split)
        if not isinstance(losses, dict) or "loss" not in losses or not all(
                map(is_finite_number, losses.values())):
            return f"has no finite {split} loss"
    for key in ("train_seconds", "epoch_seconds"):
        if not (is_finite_number(record.get(key)) and record[key] > 0):
            return f"has no {key.replace('_', ' ')}"
    codes = record.get("codes", torch.zeros(0, 1))
    if not (isinstance(codes, torch.Tensor) and codes.ndim == 2 and codes.is_floating_point()
            and codes.isfinite().all()):
        return "holds test codes that are not a finite (N, D) tensor"
    return None


def brief(value, limit=40):
    """A value read from a file, for a one-line message: its repr on one line, cut short; a
    tensor by its shape."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def dataclass_from(cls, values, path, parser=None, choices=None):
    """cls(**values) for a dict read from `path`, checked as data: each field known to cls and of
    its type (an int will do for a float; a bool is no number), a field that a flag of `parser`
    sets accepted by that flag as the command line's value would be, a string among `choices`
    ({field: allowed values}). A field missing from `values` takes its default, so that files
    written before a field was added still load."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = [name for name in values if name not in fields]
    if unknown:
        raise ProjectError(f"{path}: its config has a field this version does not know "
                           f"({brief(unknown[0])}; a newer version of this project wrote it?) and "
                           "cannot use; evaluate it with the version that wrote it, or retrain")
    flags = {action.dest: action for action in (parser._actions if parser else [])}
    for name, field in fields.items():
        if name not in values and field.default is dataclasses.MISSING:
            raise ProjectError(f"{path}: its config lacks the field {name!r}; the file is damaged "
                               "or from another project: retrain")
        value = values.get(name, field.default)
        if not (field_value_fits(value, field.type)
                and (name not in flags or flag_accepts(flags[name], value))
                and value in (choices or {}).get(name, [value])):
            raise ProjectError(f"{path}: its config's {name} is {brief(values[name])}, not a valid "
                               f"{field.type.__name__}; the file is damaged: retrain")
    return cls(**values)


def field_value_fits(value, kind):
    """Whether a value read from a file is of the dataclass field type `kind` (bool, int, float or
    str; an int will do for a float, and a bool is not a number)."""
    if kind is bool or kind is str:
        return isinstance(value, kind)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return is_finite_number(value)


def state_dict_problem(state, expected):
    """What keeps the tensors `state` (read from a file) from being loaded where `expected` (a
    model's own state_dict) stands, in a few words, or None: a name missing or extra, a tensor of
    another shape or dtype, a value that is NaN or infinite."""
    if not isinstance(state, dict):
        return f"its weights are {brief(state)}, not a table of tensors"
    missing = [name for name in expected if name not in state]
    extra = [name for name in state if name not in expected]
    if missing or extra:
        return f"its weights do not fit its own config ({(missing or extra)[0]} is " \
               f"{'missing' if missing else 'extra'})"
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != expected[name].shape \
                or tensor.dtype != expected[name].dtype:
            return f"its weights do not fit its own config ({name} is not a " \
                   f"{expected[name].dtype} tensor of shape {tuple(expected[name].shape)})"
        if tensor.is_floating_point() and not tensor.isfinite().all():
            return f"its weight {name} holds NaN or infinite values"
    return None


HOW_ADAM_RUNS = ("fused", "foreach", "capturable", "differentiable")  # this machine's, not the file's


def restore_adam(optimizer, saved):
    """Load Adam's `saved` state_dict into `optimizer`, built as this project builds it for this
    device, or raise ValueError (or the KeyError, TypeError, ... load_state_dict raises): the
    settings both hold must agree, and its moments fit their weights, be finite, step and second
    moments not negative. A damaged file then fails here, not inside Adam's step; how Adam runs
    (fused or not) stays the optimizer's, so a checkpoint moves between devices."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        raise ValueError(f"its Adam state is {brief(saved)}")
    own_groups, groups = optimizer.state_dict()["param_groups"], saved["param_groups"]
    if len(groups) != len(own_groups) or not all(map(same_adam_settings, groups, own_groups)):
        raise ValueError("its settings are not those of the Adam this project trains with")
    how = [{key: group[key] for key in HOW_ADAM_RUNS if key in group} for group in own_groups]
    optimizer.load_state_dict({**saved, "param_groups": [{**group, **own_how}
                                                         for group, own_how in zip(groups, how)]})
    if any(key not in group for group, own in zip(optimizer.param_groups, own_groups)
           for key in own):  # what torch does not fill in for an older file (eps, betas, ...)
        raise ValueError("its settings lack one the Adam this project trains with has")
    states = [optimizer.state[parameter] for group in optimizer.param_groups
              for parameter in group["params"]]
    if any(states) and not all(set(state) >= {"step", "exp_avg", "exp_avg_sq"} for state in states):
        raise ValueError("its moments are missing for some weights")
    for parameter, state in zip((p for group in optimizer.param_groups for p in group["params"]),
                                states):
        for name, value in state.items():  # step, exp_avg, exp_avg_sq
            if not isinstance(value, torch.Tensor) or value.dtype != parameter.dtype \
                    or value.shape != (() if name == "step" else parameter.shape) \
                    or not value.isfinite().all() or (name != "exp_avg" and (value < 0).any()):
                raise ValueError("Adam's moments do not fit the weights or are not finite")


def same_adam_settings(group, own):
    """Whether a saved param group holds the settings of `own` (betas, eps, weight decay, ...; one
    an older torch lacks aside) and a positive learning rate (a schedule changes it)."""
    if not isinstance(group, dict) or not is_finite_number(group.get("lr")) or group["lr"] <= 0:
        return False
    keys = [key for key in own if key in group and key not in ("params", "lr", *HOW_ADAM_RUNS)]
    return all(not isinstance(group[key], torch.Tensor) and group[key] == own[key] for key in keys)


def saved_epochs(paths):
    """What the checkpoint files `paths` hold, read from the disk: "ck/vae.pt holds epoch 3"."""
    held = []
    for path in map(Path, paths):
        if path.is_file():
            try:
                held.append(f"{path} holds epoch {len(load_checkpoint(path)['history'])}")
            except ProjectError:
                held.append(f"{path} is unreadable")
    return "; ".join(held) or "no checkpoint is saved yet"


def stored_flags(checkpoint, path, parser):
    """The flags a checkpoint trained with, each checked as `parser` (main.py's) checks the command
    line's; a flag it does not store (added to the project since) at its default."""
    stored = checkpoint.get("args", {})
    problem = None if isinstance(stored, dict) else "its training flags are not a dict"
    for action in parser._actions:
        if problem is None and action.dest in stored \
                and not flag_accepts(action, stored[action.dest]):
            problem = f"its stored flag {action.option_strings[0]} is {brief(stored[action.dest])}"
    if problem:
        raise ProjectError(f"{path}: {problem}; the file is damaged or from another "
                           "version: retrain, or restore it")
    defaults = {action.dest: action.default for action in parser._actions
                if action.default is not argparse.SUPPRESS}
    return {**defaults, **stored}


def flag_accepts(action, value):
    """Whether the flag of `action` takes `value`, as parsed from a command line would be."""
    values = value if isinstance(value, list) and action.nargs else [value]
    if value is None or isinstance(value, bool):
        return value == action.default or action.nargs is not None or action.const is not None
    for item in values:
        try:
            parsed = (action.type or str)(str(item))
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            return False
        if parsed != item or (action.choices is not None and item not in action.choices):
            return False
    return True
