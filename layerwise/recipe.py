"""Recipes: YAML files that declare a network of blocks and how to train it.

:func:`load_recipe` reads a file with ``yaml.safe_load``, applies ``key=value`` overrides,
and checks everything (keys, types, names of layers, objectives and datasets, the block
graph) before anything runs, reporting every problem at once with its key path.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from layerwise.errors import LayerwiseError, RecipeError
from layerwise.registry import did_you_mean
from layerwise.schedule import ScheduleConfig, check_min_lr
from layerwise.schema import Problems, build, check, join, non_negative, positive, to_plain
from layerwise.topology import block_inputs, topological_order

ACTIVATIONS = ("relu", "tanh", "elu", "sigmoid", "gelu")


def known(kind: str):
    """A ``check`` that the value names a registered component of ``kind`` (objectives, layers, datasets)."""

    def check_name(value: str, path: str, problems: Problems) -> None:
        registry = getattr(problems.context, kind)  # the registries passed to parse_recipe
        if value not in registry:
            problems.add(path, registry.unknown_message(value))

    return check_name


def known_activation(value: str, path: str, problems: Problems) -> None:
    """A ``check`` that the value is a built-in activation."""
    if value not in ACTIVATIONS:
        problems.add(path, f"unknown activation '{value}'{did_you_mean(value, ACTIVATIONS)}; "
                           f"known: {', '.join(ACTIVATIONS)}")


def unit_interval(value: float, path: str, problems: Problems) -> None:
    """A ``check`` for a noise std or probability in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        problems.add(path, f"expected a value in [0, 1], found {value}")


# A recipe's name names its run folders (``runs/<name>-<YYYYmmdd-HHMMSS>``) and appears in the
# commands layerwise prints, so it is limited to characters that no shell, terminal or file system
# reads as anything but themselves. ASCII only, so 100 characters are 100 bytes: with the time
# suffix the folder name stays far below the usual 255-byte limit.
RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def valid_run_name(value: str, path: str, problems: Problems) -> None:
    """A ``check`` that the recipe's name can name a run folder (``runs/<name>-<time>``) and no other path."""
    if not RUN_NAME.fullmatch(value):
        problems.add(path, f"expected 1 to 100 characters among ASCII letters, digits, '_', '-' and '.', not "
                           f"starting with '-' or '.' (it names the run folder), found {value[:40]!r}")


def printable_name(value: str, path: str, problems: Problems) -> bool:
    """False, with a problem recorded, when a name holds a control character, a terminal escape or
    another character that is not shown as itself (a newline, a right-to-left override).

    Names are printed in messages and tables, and may come from a stranger's recipe or checkpoint.
    """
    if value.isprintable():
        return True
    problems.add(path, f"expected printable characters only (no control characters or terminal escapes), "
                       f"found {value[:40]!r}")
    return False


def valid_subnetwork_name(value: str, path: str, problems: Problems) -> None:
    """A ``check`` that a sub-network's name prints as itself."""
    printable_name(value, path, problems)


def valid_input_names(value: list[str], path: str, problems: Problems) -> None:
    """A ``check`` that the block names in ``inputs`` print as themselves (an unknown one is quoted in a message)."""
    for index, name in enumerate(value):
        printable_name(name, join(path, index), problems)


def valid_block_name(value: str, path: str, problems: Problems) -> None:
    """A ``check`` that a block name can key the graph's modules and is not the image's name.

    (Names that clash with attributes of ``torch.nn.ModuleDict`` are refused when the network
    is built: this module must not import torch.)"""
    if value == "input":
        problems.add(path, "'input' is reserved: it names the image in other blocks' inputs")
    elif not printable_name(value, path, problems):
        pass
    elif not value or "." in value:
        problems.add(path, f"expected a non-empty name without '.', found {value[:40]!r}")


def valid_seed(value: int, path: str, problems: Problems) -> None:
    """A ``check`` that a seed is one that PyTorch's generators accept, with room for per-epoch offsets."""
    if not 0 <= value < 2**63:
        problems.add(path, f"expected a seed in [0, 2^63), found {value}")


@dataclass
class AugmentConfig:
    """On-device augmentation of the training images (both off by default; never at evaluation)."""

    # Pad each side with this many zero (black) pixels, then crop back to the image's size at a
    # random offset: 0 is off, 4 is the usual for CIFAR-10. Must be below the image's height and width.
    crop_padding: int = check(non_negative, 0)
    # Mirror half of the images left-right. For natural images (cifar10, fashion_mnist's clothes);
    # a mirrored digit is no longer the same digit, so leave it off for mnist (it is not refused).
    flip: bool = False


@dataclass
class DataConfig:
    """Which dataset to train on, and how to batch it."""

    dataset: str = check(known("datasets"))
    batch_size: int = check(positive, 256)
    # Larger test batches only speed up evaluation; they do not change any result.
    test_batch_size: int = check(positive, 1000)
    # Std of Gaussian noise added to training (and the run's test) images, in [0, 1]: noise adaptation.
    train_noise: float = check(unit_interval, 0.0)
    # Use only the first N training samples: for smoke tests and quick experiments.
    train_limit: int | None = check(positive, None)
    # Hold out the last N training samples as a validation set, reported each epoch as
    # val_acc. Choose hyper-parameters on it, never on the test set.
    validation: int = check(non_negative, 0)
    # Where train_noise is added (training and the run's own tests): "pixel", in [0, 1] pixel
    # space before normalisation, then clipped (the hybrid paper's text); or "normalized", after
    # normalisation and not clipped (the authors' published notebook: img + std * randn).
    noise_space: Literal["pixel", "normalized"] = "pixel"
    # Random crop and flip of the training images, drawn per sample and epoch from the seed.
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_build__(self, path: str, problems: Problems) -> None:
        """The crop padding must leave part of the image in every crop: below its height and width."""
        datasets = getattr(problems.context, "datasets", None)
        if datasets is None or self.dataset not in datasets:  # an unknown name is reported by its own check
            return
        shape = datasets.get(self.dataset).shape
        smallest = min(shape[-2:])
        if self.augment.crop_padding >= smallest:
            problems.add(join(path, "augment.crop_padding"),
                         f"expected a value below {smallest}, the size of '{self.dataset}' images "
                         f"({shape[-2]}x{shape[-1]}), found {self.augment.crop_padding}")


@dataclass
class BlockConfig:
    """One block: a layer, optional batch-norm and activation, and the objective that trains it."""

    name: str = check(valid_block_name)
    layer: str = check(known("layers"))
    out: int | None = check(positive, None)
    act: str | None = check(known_activation, None)
    norm: bool = False
    kernel_size: int = check(positive, 3)
    stride: int | None = check(positive, None)
    padding: int = check(non_negative, 0)
    p: float = check(unit_interval, 0.5)
    inputs: list[str] | None = check(valid_input_names, None)
    objective: str | dict[str, Any] = "none"
    detach: bool = False
    freeze: bool = False
    # The objective's typed config, built and validated once, by __post_build__ (not YAML).
    objective_config: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_build__(self, path: str, problems: Problems) -> None:
        """The objective must be registered and its options must fit its config class."""
        self.objective_config = objective_config(self.objective, join(path, "objective"),
                                                 problems.context.objectives, problems)

    @property
    def objective_name(self) -> str:
        """The objective's registered name."""
        return objective_name(self.objective)

    @property
    def objective_options(self) -> dict[str, Any]:
        """The objective's options, without its name."""
        if isinstance(self.objective, str):
            return {}
        return {k: v for k, v in self.objective.items() if k != "name"}


@dataclass
class SubnetworkConfig:
    """A named group of blocks; the paper's unit is one local block then one backprop block."""

    name: str = check(valid_subnetwork_name)
    blocks: list[BlockConfig]


@dataclass
class ModelConfig:
    """The network: sub-networks in order; the last block is the classifier head."""

    subnetworks: list[SubnetworkConfig]
    # Extra streams carried through the blocks beside the data (layerwise/streams.py), by the
    # stream maker's name and options: {name: ff, negatives: hardest}. Left out, the maker that
    # the blocks' objectives read (if any), with its defaults: it is then filled in here.
    streams: str | dict[str, Any] | None = None
    # The stream maker's typed config, built and validated once, by __post_build__ (not YAML).
    streams_config: Any = field(default=None, init=False, repr=False, compare=False)

    def blocks(self) -> list[BlockConfig]:
        """Every block, in declaration order."""
        return [block for sub in self.subnetworks for block in sub.blocks]

    def __post_build__(self, path: str, problems: Problems) -> None:
        """The stream maker must be registered, take these options, and be the one the objectives read."""
        objectives = problems.context.objectives
        needed = {}  # maker name -> key path of the first block whose objective reads its streams
        for s, sub in enumerate(self.subnetworks):
            for b, block in enumerate(sub.blocks):
                maker = getattr(objectives.get(block.objective_name), "streams", None) \
                    if block.objective_name in objectives else None
                if maker is not None:
                    needed.setdefault(maker.name, join(path, f"subnetworks[{s}].blocks[{b}].objective"))
        key = join(path, "streams")
        if self.streams is None:
            if len(needed) > 1:
                problems.add(key, f"the objectives read the streams of {' and '.join(sorted(needed))}; one network "
                                  f"carries one maker's streams")
                return
            if not needed:
                return
            self.streams = {"name": next(iter(needed))}
        self.streams_config = named_config(self.streams, key, getattr(problems.context, "streams", {}), problems,
                                           "the stream maker's name, e.g. ff")
        name = objective_name(self.streams)
        for maker, where in needed.items():
            if maker != name:
                problems.add(key, f"'{name}' streams, but the objective at {where} reads the streams of '{maker}'")

    @property
    def streams_name(self) -> str | None:
        """The stream maker's registered name, or None when the network carries no extra stream."""
        return None if self.streams is None else objective_name(self.streams)


@dataclass
class OptimizerConfig:
    """An optimizer for one group of parameters."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = check(positive, 1e-3)
    weight_decay: float = check(non_negative, 0.0)
    momentum: float = check(non_negative, 0.9)  # sgd only


@dataclass
class OptimConfig:
    """One optimizer per local block (``local``) and one for all backprop blocks (``global``)."""

    local: OptimizerConfig = field(default_factory=OptimizerConfig)
    global_: OptimizerConfig = field(default_factory=OptimizerConfig, metadata={"key": "global"})
    # The learning rates from epoch to epoch, for both kinds of optimizer, each relative to its own lr:
    # {name: constant | step | cosine, warmup_epochs: 0, step_size: 10, gamma: 0.1, min_lr: 0.0}
    # (step_size and gamma for step, min_lr for cosine; see layerwise/schedule.py). The default,
    # constant without warm-up, keeps every epoch at the lr.
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_build__(self, path: str, problems: Problems) -> None:
        """A cosine schedule's min_lr may not exceed either optimizer's lr."""
        check_min_lr(self.schedule, {join(path, "local.lr"): self.local.lr, join(path, "global.lr"): self.global_.lr},
                     join(path, "schedule"), problems)


@dataclass
class TrainConfig:
    """How long and where to train."""

    epochs: int = check(positive, 10)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # What a NaN or infinite loss does: "stop" names the block and its likely cause, keeping
    # the last good checkpoint; "skip" leaves the optimizers unstepped on that batch and counts
    # it in metrics.jsonl as skipped_batches (see layerwise/nonfinite.py for the cost on a GPU).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Train each local block as soon as its output exists, and drop activations that no
    # later loss needs. Same gradients either way; it only matters for memory, and only where
    # the global gradient does not pass through (HSIC-only stacks). false keeps the whole
    # graph to the end of the step, to measure the difference.
    free_early: bool = True
    # bf16 runs the forward pass under autocast in bfloat16 (nHSIC kernels stay in float32).
    precision: Literal["fp32", "bf16"] = "fp32"
    # Write TensorBoard event files (per-epoch scalars, every block's local metrics, the recipe as
    # hyper-parameters) to the run's tb/ folder; `layerwise train --tensorboard` sets it. Needs the
    # optional extra: pip install 'layerwise[tensorboard]'.
    tensorboard: bool = False
    # Spread the blocks over this many processes, each training its own stage of blocks on every
    # batch, pipelined (layerwise/pipeline.py, docs/distributed.md): the weights are those one
    # process trains. Stages are cut where no global gradient crosses; `layerwise validate R.yaml
    # --stages N` shows the cut. `layerwise train --stages N` overrides it, on a resume too.
    stages: int = check(positive, 1)
    # Named cut points instead: cut after each of these blocks (free cuts only), making one more stage than
    # there are names; `layerwise train --stages N` with another count cuts automatically instead.
    cuts: list[str] = field(default_factory=list)

    def __post_build__(self, path: str, problems: Problems) -> None:
        """Named cuts make len(cuts) + 1 stages: a train.stages that says otherwise is a contradiction."""
        if self.cuts and self.stages not in (1, len(self.cuts) + 1):
            problems.add(join(path, "stages"), f"train.cuts names {len(self.cuts)} cut(s), so {len(self.cuts) + 1} "
                                               f"stages; found stages {self.stages}")


@dataclass
class Recipe:
    """A whole, validated recipe."""

    name: str = check(valid_run_name)
    data: DataConfig
    model: ModelConfig
    seed: int = check(valid_seed, 0)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data, as it would be written in YAML."""
        return to_plain(self)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file safely, turning every failure into a one-line error naming the file."""
    if not path.is_file():
        raise LayerwiseError(f"{path}: recipe file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise LayerwiseError(f"{path}: not valid YAML{where}: {reason}") from None
    except UnicodeDecodeError:
        raise LayerwiseError(f"{path}: not a text file, so not a YAML recipe") from None
    except RecursionError:
        raise LayerwiseError(f"{path}: not a usable YAML recipe: nested too deeply") from None
    except OSError as exc:  # unreadable: permissions, a folder vanished, an I/O error
        raise LayerwiseError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    except ValueError as exc:  # PyYAML lets Python's own limits through, e.g. an integer of 5000 digits
        raise LayerwiseError(f"{path}: not a usable YAML recipe: {str(exc).splitlines()[0]}") from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, registries: Any) -> Recipe:
    """Read, override and validate a recipe file; raise :class:`RecipeError` listing all problems.

    ``registries`` (a :class:`layerwise.plugins.Registries`) says which objectives, layers and
    datasets exist; :func:`layerwise.factory.load_recipe` passes the loaded plugins' ones.
    """
    path = Path(path)
    return parse_recipe(read_yaml(path), str(path), overrides, registries=registries)


def parse_recipe(data: Any, source: str, overrides: list[str] | tuple[str, ...] = (), *, registries: Any) -> Recipe:
    """Validate already-parsed recipe data (from a file or a checkpoint's metadata)."""
    try:
        data = copy.deepcopy(data)
    except RecursionError:  # crafted metadata: JSON nested deeper than Python's stack
        raise RecipeError(source, ["nested too deeply to be a recipe"]) from None
    problems = Problems(context=registries)
    for text in overrides:
        apply_override(data, text, problems)
    if problems:
        raise RecipeError(source, problems.items)
    recipe = build(Recipe, data, "", problems)
    if recipe is not None:
        check_semantics(recipe, problems)
    if problems:
        raise RecipeError(source, problems.items)
    return recipe


def apply_override(data: Any, text: str, problems: Problems) -> None:
    """Apply ``a.b.c=value`` to ``data``. List items are picked by index or by their ``name``."""
    if "=" not in text:
        problems.add(f"override '{text}'", "expected KEY=VALUE, for example train.epochs=3")
        return
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        problems.add(f"override '{text}'", "the key has an empty part")
        return
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError, ValueError):
        value = raw  # an unparsable value is taken as a plain string, and type-checked later
    node, path = data, ""
    for position, part in enumerate(parts):
        last = position == len(parts) - 1
        if isinstance(node, list):
            index = list_index(node, part)
            if index is None:
                names = [str(item.get("name")) for item in node if isinstance(item, dict)]
                problems.add(join(path, part), f"no list item with index or name '{part}'"
                                               f"{did_you_mean(part, names)} (override '{text}')")
                return
            if last:
                node[index] = value
                return
            node, path = node[index], join(path, index)
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if part not in node:
                node[part] = {}  # a missing section: the schema check will say if the key is wrong
            node, path = node[part], join(path, part)
        else:
            problems.add(path or key, f"cannot set '{part}' inside {type(node).__name__} (override '{text}')")
            return


def list_index(items: list, part: str) -> int | None:
    """Index of the list item named ``part``, or ``part`` read as an integer index."""
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return index
    # ASCII digits only: str.isdigit() also accepts characters such as '²' that int() rejects.
    if re.fullmatch(r"-?[0-9]+", part) and -len(items) <= int(part) < len(items):
        return int(part) % len(items)
    return None


def block_paths(recipe: Recipe) -> dict[str, str]:
    """Block name -> its key path in the recipe, for error messages."""
    return {
        block.name: f"model.subnetworks[{s}].blocks[{b}]"
        for s, sub in enumerate(recipe.model.subnetworks)
        for b, block in enumerate(sub.blocks)
    }


def check_semantics(recipe: Recipe, problems: Problems) -> None:
    """Checks that span blocks: at least one block, unique names, known inputs, no cycles."""
    if not recipe.model.blocks():
        problems.add("model.subnetworks", "the model needs at least one block")
        return
    paths = block_paths(recipe)
    seen: set[str] = set()
    for block in recipe.model.blocks():
        if block.name in seen:
            problems.add(f"{paths[block.name]}.name", f"block name '{block.name}' is used twice")
        seen.add(block.name)
    check_graph(recipe, paths, problems)


def objective_name(objective: str | dict) -> str:
    """The name in a block's ``objective`` entry: the string itself, or the mapping's ``name``."""
    return objective if isinstance(objective, str) else str(objective.get("name", ""))


def objective_config(objective: str | dict, path: str, objectives, problems: Problems):
    """Build the objective's typed config from a block's ``objective`` entry (None when invalid)."""
    return named_config(objective, path, objectives, problems, "the objective's name, e.g. nhsic")


def named_config(entry: str | dict, path: str, registry, problems: Problems, what: str):
    """Build the typed config of a registered component from ``name`` or ``{name: ..., **options}``
    (an objective, a stream maker); None when invalid, with the problems recorded."""
    name = objective_name(entry)
    name_path = path if isinstance(entry, str) else f"{path}.name"
    if not name:
        problems.add(name_path, f"required key is missing ({what})")
        return None
    if name not in registry:
        problems.add(name_path, registry.unknown_message(name))
        return None
    options = {} if isinstance(entry, str) else {k: v for k, v in entry.items() if k != "name"}
    return build(registry.get(name).Config, options, path, problems)


def check_graph(recipe: Recipe, paths: dict[str, str], problems: Problems) -> None:
    """Unknown input names and cycles (the rules of :mod:`layerwise.topology`)."""
    names = list(paths)
    ok = True
    for block in recipe.model.blocks():
        for source in block.inputs or []:
            if source not in paths and source != "input":
                problems.add(f"{paths[block.name]}.inputs", f"unknown block '{source}'"
                                                            f"{did_you_mean(source, names + ['input'])}")
                ok = False
    if ok:
        try:
            topological_order(block_inputs((block.name, block.inputs) for block in recipe.model.blocks()))
        except LayerwiseError as exc:
            problems.add("model", str(exc))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML text."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
