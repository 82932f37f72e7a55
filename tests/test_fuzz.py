"""Fuzzing ``layerwise validate``, ``eval`` and ``train --resume``: malformed recipes, overrides,
checkpoints and resume states give a clean error, never a traceback.

Hypothesis mutates a valid recipe (deleted keys, wrong types, random strings, negative and huge
numbers, nested garbage, unknown and dangerous names, unicode), sometimes damages its YAML text,
and adds random overrides. Each case runs in-process through the real entry point and must end
with exit code 0, or exit code 2 and one ``error:`` message. Derandomized, so CI sees the same
cases every run.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from layerwise.checkpoint import DIGEST_KEY, WEIGHTS_FILE, read_safetensors, safetensors_with_digest
from layerwise.resume import STATE_FILE
from tests.helpers import folder_snapshot, make_finished_run, tiny_recipe


def base_recipe() -> dict:
    """A valid recipe that touches every section, so every section gets mutated."""
    data = tiny_recipe()
    data["data"].update({"train_noise": 0.1, "validation": 100, "test_batch_size": 500})
    data["model"]["subnetworks"][0]["blocks"].insert(
        0, {"name": "conv", "layer": "conv2d", "out": 4, "kernel_size": 3, "padding": 1, "norm": True, "act": "relu"})
    data["model"]["subnetworks"][0]["blocks"].insert(1, {"name": "pool", "layer": "maxpool", "kernel_size": 2})
    data["model"]["subnetworks"][0]["blocks"].insert(2, {"name": "flat", "layer": "flatten"})
    data["model"]["subnetworks"][1]["blocks"].insert(0, {"name": "skip", "layer": "linear", "out": 8,
                                                         "inputs": ["hsic1", "bp1"], "detach": True})
    data["optim"] = {"local": {"name": "adam", "lr": 1e-3}, "global": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}
    data["train"].update({"on_nonfinite": "skip"})
    return data


BASE = base_recipe()

# Names a user (or an attacker) might write where a registered name is expected.
NAMES = ["nhsic", "none", "backprop", "linear", "conv2d", "maxpool", "flatten", "dropout", "mnist", "cifar10",
         "relu", "adam", "sgd", "cca", "cka", "input", "head", "hsic1", "keys", "training", "forward", "",
         ".", "..", "../../etc/passwd", "a.b", "os.system", "builtins.eval", "__import__", "subprocess.Popen",
         "torch.load", "ḿnist", "☃", "ñame", "\u202e", "x" * 300]
SPECIAL_NUMBERS = [0, -1, 1, 2, -(2**31), 2**31, 2**53 + 1, 2**62, 2**63 - 1, 2**63, -(2**63) - 1, 2**64,
                   10**30, 10**100, 0.0, -0.0, 1e-300, 1e-30, 5e-324, 1e308, float("inf"), float("-inf"),
                   float("nan"), 0.5, -0.5, True, False]
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # no lone surrogates: not UTF-8
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT,
                    st.sampled_from(NAMES), st.sampled_from(SPECIAL_NUMBERS))
GARBAGE = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                       max_leaves=6)
# Override values are YAML text: tricky snippets, or anything.
OVERRIDE_VALUES = st.one_of(
    st.sampled_from(["", "[", "{", "]]", "{a: 1}", "[1, 2]", "1e400", "1.0e400", "-1", "null", "~", ".nan",
                     "&a [*a]", "!!python/object/apply:os.system ['echo pwned']", "9" * 5000, "true", "ḿ",
                     "0x10", "1_000", "'quoted'", "\t", "a: b: c", "- x"]),
    TEXT, st.sampled_from(NAMES), st.sampled_from([str(n) for n in SPECIAL_NUMBERS]))
OVERRIDE_KEYS = st.one_of(
    st.sampled_from(["data.batch_size", "train.epochs", "seed", "name", "optim.global.lr", "optim.local.name",
                     "model.subnetworks.sn1.blocks.hsic1.objective.sigma", "model.subnetworks.0.blocks.0.out",
                     "model.subnetworks.-1.blocks.-1.out", "model.subnetworks.--1.name", "model.subnetworks.²",
                     "model.subnetworks.99999999999999999999", "model.subnetworks.sn2.blocks.skip.inputs",
                     "model", "model.subnetworks", "data", "train.on_nonfinite", "a..b", ".", "x.", "__class__",
                     "data.dataset.name"]),
    st.builds(".".join, st.lists(st.sampled_from(["model", "subnetworks", "sn1", "blocks", "hsic1", "0", "-1",
                                                 "objective", "out", "beta", "layer", "data", "x"]),
                                 min_size=1, max_size=6)),
    TEXT.filter(lambda t: "=" not in t))


def locations(node: Any, found: list | None = None) -> list[tuple[Any, Any]]:
    """Every (container, key) pair in a plain-data tree, the tree's own slots included."""
    found = [] if found is None else found
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        found.append((node, key))
        locations(value, found)
    return found


def same_kind(value: Any) -> st.SearchStrategy:
    """Values of the same type as ``value`` (so that validation goes deeper than the type check)."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.integers(-3, 70) | st.sampled_from([n for n in SPECIAL_NUMBERS if type(n) is int])
    if isinstance(value, float):
        return st.floats() | st.sampled_from([n for n in SPECIAL_NUMBERS if type(n) is float])
    if isinstance(value, str):
        return st.sampled_from(NAMES) | TEXT
    return GARBAGE


def mutate(recipe: dict, draw) -> None:
    """Apply one random mutation in place."""
    container, key = draw(st.sampled_from(locations(recipe)))
    action = draw(st.sampled_from(["tweak", "tweak", "tweak", "delete", "replace", "add", "grow", "wrap"]))
    if action == "tweak":
        container[key] = draw(same_kind(container[key]))
    elif action == "delete":
        del container[key]
    elif action == "replace":
        container[key] = draw(GARBAGE)
    elif action == "add" and isinstance(container, dict):
        container[draw(TEXT | st.sampled_from(NAMES))] = draw(GARBAGE)
    elif action == "grow" and isinstance(container[key], list) and container[key]:
        # a copy of an item: duplicate block and sub-network names
        container[key].append(copy.deepcopy(draw(st.sampled_from(container[key]))))
    else:
        container[key] = [container[key]]


def mutated_text(draw, mutations: int) -> str:
    """The base recipe after ``mutations`` random mutations, as YAML text."""
    recipe = copy.deepcopy(BASE)
    for _ in range(mutations):
        if locations(recipe):
            mutate(recipe, draw)
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


BLOCK_NAMES = [b["name"] for sub in BASE["model"]["subnetworks"] for b in sub["blocks"]]
SIZES = st.integers(0, 40) | st.sampled_from([2**31, 2**40, 2**62, 2**63 - 1])
# Well-typed values for the keys that shape the graph: these reach the graph and shape checks.
SHAPE_VALUES = {
    "out": SIZES, "kernel_size": SIZES, "stride": SIZES, "padding": SIZES,
    "layer": st.sampled_from(["linear", "conv2d", "maxpool", "avgpool", "flatten", "batchnorm", "dropout"]),
    "inputs": st.lists(st.sampled_from(BLOCK_NAMES + ["input"]), min_size=1, max_size=3),
    "act": st.sampled_from(["relu", "tanh", "gelu", "sigmoid", "elu"]), "norm": st.booleans(),
    "detach": st.booleans(), "freeze": st.booleans(), "p": st.floats(0, 1),
    "objective": st.sampled_from(["none", "nhsic", "backprop"])
    | st.fixed_dictionaries({"name": st.just("nhsic")}, optional={
        "sigma": st.floats(1e-40, 1e3), "normalization": st.sampled_from(["cca", "cka"]),
        "estimator": st.sampled_from(["exact", "rff"]), "features": SIZES}),
}


def reshaped_text(draw) -> str:
    """The base recipe with one or two graph-shaping keys of some blocks set to well-typed values."""
    recipe = copy.deepcopy(BASE)
    blocks = [block for sub in recipe["model"]["subnetworks"] for block in sub["blocks"]]
    for _ in range(draw(st.integers(1, 2))):
        block = draw(st.sampled_from(blocks))
        key = draw(st.sampled_from(sorted(SHAPE_VALUES)))
        block[key] = draw(SHAPE_VALUES[key])
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def damaged(draw, text: str) -> str:
    """``text`` with a few characters replaced by YAML syntax or random text."""
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 3))
        insert = draw(st.sampled_from(["", ":", "- ", "{", "[", "&a ", "*a", "!!str ", "\t", "\n  ", "'"]) | TEXT)
        text = text[:at] + insert + text[at + cut:]
    return text


def override_list(draw) -> list[str]:
    """One or two ``KEY=VALUE`` strings, or a string without ``=``; none start with '-' (an option)."""
    pairs = draw(st.lists(st.tuples(OVERRIDE_KEYS, OVERRIDE_VALUES), min_size=1, max_size=2))
    plain = [draw(TEXT.filter(lambda t: t and "=" not in t))] if draw(st.integers(0, 9)) == 0 else []
    return [f"{key}={value}" for key, value in pairs] + plain


@st.composite
def cases(draw) -> tuple[str, list[str]]:
    """(recipe text, overrides). The kinds are mixed so that many cases pass the YAML and type
    checks and reach the deeper checks (names, graph, shapes) instead of failing early."""
    kind = draw(st.sampled_from(["shape", "shape", "shape", "tweak", "tweak", "overrides", "overrides", "garbage",
                                 "text"]))
    if kind == "shape":
        return reshaped_text(draw), []
    if kind == "tweak":
        return mutated_text(draw, draw(st.integers(1, 2))), []
    if kind == "overrides":
        return mutated_text(draw, 0), override_list(draw)
    if kind == "garbage":
        return mutated_text(draw, draw(st.integers(2, 5))), override_list(draw) if draw(st.booleans()) else []
    return damaged(draw, mutated_text(draw, draw(st.integers(0, 1)))), []


def check_clean(result) -> None:
    assert result.code in (0, 2), (result.code, result.err)
    assert "Traceback" not in result.out + result.err, result.err
    if result.code == 2:
        assert result.err.lstrip().startswith("error:"), result.err
    else:
        assert result.out.startswith("ok:"), result.out


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=cases())
def test_validate_never_shows_a_traceback(cli, tmp_path, case):
    text, extra = case
    path = tmp_path / "fuzzed.yaml"
    path.write_text(text, encoding="utf-8")
    args = [arg for arg in extra if not arg.startswith("-")]
    check_clean(cli("validate", str(path), *args))


def test_the_unmutated_recipe_is_valid(cli, tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    result = cli("validate", str(path))
    assert result.code == 0, result.err


# --------------------------------------------------------------------------- crafted checkpoints and resume states
#
# The same mutations, applied to the JSON metadata of a small saved checkpoint or resume state
# (the recipe, the record, the optimizers, the epoch), plus raw strings, deleted keys and damaged
# tensors; the file is then signed again, as whoever crafts one can. `eval` and `train --resume`
# must succeed, or fail with one line and exit code 2, leaving the run folder byte for byte as it was.

METADATA_TEXT = st.sampled_from(
    ["", "abc", "-1", "0", "1", "2", "99999", "1e3", " 1", "1_0", "٣", "null", "NaN", "true", "[]", "{}", "[1,2,3]",
     "5", '{"a":1}', '{"epoch":"x"}', '"x"', "9" * 5000, "[" * 100_000 + "]" * 100_000, "[" * 500 + "]" * 500,
     '{"a":' * 900 + "1" + "}" * 900, "layerwise-resume-1", "layerwise-resume-2", "\x1b[2J", "a\nb"]) | TEXT


def mutated_json(draw, text: str) -> str:
    """``text`` parsed as JSON, mutated like a recipe, and written back (a plain string if it is not JSON)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return draw(METADATA_TEXT)
    holder = [value]  # so that a scalar, or the whole value, can be mutated too
    for _ in range(draw(st.integers(1, 3))):
        if locations(holder):
            mutate(holder, draw)
    return json.dumps(holder[0] if holder and draw(st.integers(0, 9)) else holder)


def damaged_tensor(draw, tensor: torch.Tensor) -> torch.Tensor | None:
    """None (deleted), or a tensor of another shape or type."""
    return draw(st.sampled_from([
        None, torch.zeros(1), torch.zeros(tensor.numel() + 1), torch.zeros(tensor.shape, dtype=torch.int64),
        tensor.to(torch.float64), tensor.reshape(-1), torch.full(tensor.shape, float("nan")), torch.zeros(0)]))


def crafted(draw, path: Path, with_tensors: bool) -> None:
    """Apply one to three random changes to the safetensors file at ``path`` and sign it again."""
    tensors, metadata = read_safetensors(path, "file")
    metadata.pop(DIGEST_KEY)
    # Mostly the keys that are read (changes to the others succeed, and teach little).
    read = [key for key in ("layerwise.recipe", "epoch", "record", "optimizers", "format") if key in metadata]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(read) | st.sampled_from(sorted(metadata) + ["epoch", "format", "metrics"]))
        action = draw(st.sampled_from(["json", "json", "json", "json", "text", "delete", "add"]
                                      + (["tensor", "tensor"] if with_tensors else [])))
        if action == "json":
            metadata[key] = mutated_json(draw, metadata.get(key, "null"))
        elif action == "text":
            metadata[key] = draw(METADATA_TEXT)
        elif action == "delete":
            metadata.pop(key, None)
        elif action == "add":
            metadata[draw(TEXT)] = draw(METADATA_TEXT)
        else:
            name = draw(st.sampled_from(sorted(tensors) + ["optim/0/99/exp_avg", "rng/torch/rank5", "other"]))
            damaged = damaged_tensor(draw, tensors.get(name, torch.zeros(3)))
            if damaged is None:
                tensors.pop(name, None)
            else:
                tensors[name] = damaged
    metadata.pop(DIGEST_KEY, None)
    path.write_bytes(safetensors_with_digest(tensors, metadata))


def check_one_line_or_success(result, before: dict, after: dict) -> None:
    event(f"exit code {result.code}")  # --hypothesis-show-statistics: how many cases get past the checks
    assert result.code in (0, 2), (result.code, result.err)
    assert "Traceback" not in result.out + result.err, result.err
    if result.code == 2:
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), result.err
        assert "\x1b" not in result.err, result.err
        assert after == before, "a refused command changed the run folder"


@pytest.fixture
def finished_run(tmp_path, monkeypatch) -> Path:
    """One small run folder, made once per test; every example works on a copy.

    The data are 64 random images instead of MNIST: what is fuzzed is the metadata, and loading
    and evaluating 70,000 real images in each of the cases that succeed would take minutes.
    """
    def small_split(spec, split, data_root=None):
        generator = torch.Generator().manual_seed(len(split))
        return (torch.randint(0, 256, (64, *spec.shape), dtype=torch.uint8, generator=generator),
                torch.arange(64) % spec.num_classes)

    monkeypatch.setattr("layerwise.train_run.load_split", small_split)
    monkeypatch.setattr("layerwise.noise_eval.load_split", small_split)
    return make_finished_run(tmp_path / "pristine" / "tiny-20260101-000000")


FUZZ_CASES = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
"""The crafted-file fuzzes: 200 cases each (the suite must stay under 10 minutes), reproducible, for a
fixture-scoped finished run."""


def fresh_copy(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, Path(tempfile.mkdtemp(dir=tmp_path)) / finished_run.name))


@FUZZ_CASES
@given(data=st.data())
def test_crafted_checkpoint_metadata_never_shows_a_traceback(cli, tmp_path, finished_run, data):
    run = fresh_copy(finished_run, tmp_path)
    crafted(data.draw, run / WEIGHTS_FILE, with_tensors=False)
    before = folder_snapshot(run)
    result = cli("eval", str(run), "--json", "--device", "cpu")
    check_one_line_or_success(result, before, folder_snapshot(run))
    shutil.rmtree(run.parent)


@FUZZ_CASES
@given(data=st.data())
def test_crafted_resume_states_never_show_a_traceback_or_change_the_run(cli, tmp_path, finished_run, data):
    run = fresh_copy(finished_run, tmp_path)
    crafted(data.draw, run / STATE_FILE, with_tensors=True)
    before = folder_snapshot(run)
    result = cli("train", "--resume", str(run), "--no-progress")
    check_one_line_or_success(result, before, folder_snapshot(run))
    shutil.rmtree(run.parent)
