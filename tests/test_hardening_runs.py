"""Run folders and checkpoints that may come from strangers, and the races around a run folder.

Crafted metadata in a checkpoint or resume state, recipe names that a shell or a terminal would
read as commands, two processes training one folder, a kill while a run folder is being created
(and the unfinished folder it leaves), a recipe given to ``eval``, and crafted ``metrics.jsonl``
lines. Each refusal is one line with exit code 2, and a refused command leaves the run folder
byte for byte as it was. docs/reliability.md lists these faults.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import layerwise.runs
from layerwise.checkpoint import WEIGHTS_FILE, read_safetensors
from layerwise.errors import CheckpointError, LayerwiseError
from layerwise.factory import parse_recipe
from layerwise.resume import STATE_FILE
from layerwise.runs import (
    LATEST,
    LATEST_GRACE_SECONDS,
    LOCK_FILE,
    METRICS_FILE,
    STAGING_GRACE_SECONDS,
    create_run_dir,
    lock_run,
    read_metrics,
    remove_abandoned_latest_links,
    remove_abandoned_run_folders,
    resolve_run,
)
from tests.helpers import (
    REPO,
    folder_snapshot,
    make_finished_run,
    real_mnist_present,
    resign,
    start_layerwise,
    tiny_recipe,
    wait_for,
)

# --------------------------------------------------------------------------- helpers


def one_line_error(result, *fragments: str) -> str:
    """Exit code 2 and exactly one line on stderr, 'error: ...', holding every fragment and no escape."""
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.err
    assert "\x1b" not in result.err and "Traceback" not in result.err + result.out
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def state_metadata(path: Path) -> dict[str, str]:
    return read_safetensors(path, "resume state")[1]


def optimizers_with(path: Path, change) -> str:
    """The state's 'optimizers' JSON after ``change(optimizers)``."""
    optimizers = json.loads(state_metadata(path)["optimizers"])
    change(optimizers)
    return json.dumps(optimizers)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture
def run(tmp_path) -> Path:
    return make_finished_run(tmp_path / "runs" / "tiny-20260101-000000")


def resume(cli, run: Path):
    return cli("train", "--resume", str(run), "--no-progress")


# --------------------------------------------------------------------------- 1. crafted metadata


def set_lr(value):
    def change(optimizers):
        optimizers[0]["param_groups"][0]["lr"] = value
    return change


# Refused when the state is read, before the data or the model are needed.
CRAFTED_STATES = {
    "deep-recipe": ({"layerwise.recipe": nested(100_000)}, "'layerwise.recipe' metadata is not valid JSON"),
    "deep-recipe-900": ({"layerwise.recipe": nested(900)}, "nests more than 32 levels"),
    "deep-optimizers": ({"optimizers": nested(100_000)}, "'optimizers' metadata is not valid JSON"),
    "deep-record": ({"record": '{"a":' * 900 + "1" + "}" * 900}, "'record' metadata nests more than 32"),
    "epoch-abc": ({"epoch": "abc"}, "'epoch' metadata must be a number of epochs >= 0, found 'abc'"),
    "epoch-negative": ({"epoch": "-1"}, "found '-1'"),
    "epoch-0": ({"epoch": "0"}, "'epoch' metadata is 0; expected 1 to 1"),
    "epoch-99999": ({"epoch": "99999"}, "'epoch' metadata is 99999; expected 1 to 1"),
    "optimizers-list-of-ints": ({"optimizers": "[1,2,3]"}, "'optimizers' metadata [0]: expected a mapping"),
    "optimizers-number": ({"optimizers": "5"}, "'optimizers' metadata: expected a list of optimizers, found 5"),
    "optimizers-mapping": ({"optimizers": '{"a":1}'}, "expected a list of optimizers"),
    "record-list": ({"record": "[]"}, "'record' metadata is not an epoch record: expected a mapping"),
    "record-empty": ({"record": "{}"}, "not an epoch record: epoch: expected a number of epochs"),
    "record-epoch-x": ({"record": '{"epoch":"x"}'}, "epoch: expected a number of epochs, found 'x'"),
    "record-without-seconds": ({"record": json.dumps({"epoch": 1, "train_acc": 0.5, "global_loss": 2.0, "blocks": {},
                                                      "test_acc": 0.5, "test_loss": 2.0})},
                               "not an epoch record: train_seconds: expected a number of seconds >= 0, "
                               "found no such key"),
    "record-accuracy-percent": ({"record": json.dumps({"epoch": 1, "train_acc": 50, "global_loss": 2.0, "blocks": {},
                                                       "test_acc": 0.5, "test_loss": 2.0, "train_seconds": 1})},
                                "train_acc: expected a number in [0, 1], found 50"),
    "no-optimizers": ({"optimizers": None}, "has no 'optimizers' metadata"),
    "recipe-escape-name": (None, "expected printable characters only"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_STATES))
def test_crafted_resume_state_metadata_is_one_line_and_changes_nothing(cli, run, case):
    metadata, message = CRAFTED_STATES[case]
    if metadata is None:  # a block named with a terminal escape, in the recipe the state carries
        recipe = json.loads(state_metadata(run / STATE_FILE)["layerwise.recipe"])
        recipe["model"]["subnetworks"][0]["blocks"][0]["name"] = "\x1b[2J\x1b]0;pwned\x07"
        metadata = {"layerwise.recipe": json.dumps(recipe)}
    resign(run / STATE_FILE, metadata)
    before = folder_snapshot(run)
    one_line_error(resume(cli, run), str(run / STATE_FILE), message)
    assert folder_snapshot(run) == before


# Refused once the model is built (which needs the data), still before the run folder changes.
def wrong_shape(path: Path) -> dict[str, torch.Tensor]:
    name = next(key for key in read_safetensors(path, "state")[0] if key.endswith("/exp_avg"))
    return {name: torch.zeros(1)}  # broadcasts in Adam's update: NaNs blamed on sigma, before this check


MODEL_STATES = {
    "lr-abc": (lambda path: ({"optimizers": optimizers_with(path, set_lr("abc"))}, None),
               "param_groups[0].lr: expected a finite number >= 0, found 'abc'"),
    "lr-huge-int": (lambda path: ({"optimizers": optimizers_with(path, set_lr(10**400))}, None),
                    "param_groups[0].lr: expected a finite number >= 0"),
    "capturable": (lambda path: ({"optimizers": optimizers_with(
        path, lambda o: o[0]["param_groups"][0].__setitem__("capturable", True))}, None),
        "param_groups[0].capturable: expected False"),
    "exp-avg-shape": (lambda path: (None, wrong_shape(path)), "exp_avg (tensor optim/0/"),
    "missing-moment": (lambda path: ({"optimizers": optimizers_with(
        path, lambda o: o[0]["state"]["0"].pop("exp_avg_sq"))}, None), "expected the keys exp_avg, exp_avg_sq, step"),
    "param-number": (lambda path: ({"optimizers": optimizers_with(
        path, lambda o: o[0]["state"].__setitem__("999", o[0]["state"]["0"]))}, None),
        "expected parameter numbers below"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(MODEL_STATES))
def test_a_resume_state_that_does_not_fit_the_model_is_named_and_changes_nothing(cli, run, mnist_available, case):
    make, message = MODEL_STATES[case]
    metadata, tensors = make(run / STATE_FILE)
    resign(run / STATE_FILE, metadata, tensors)
    before = folder_snapshot(run)
    one_line_error(resume(cli, run), str(run / STATE_FILE), message)
    assert folder_snapshot(run) == before


@pytest.mark.integration
def test_the_unchanged_state_resumes(cli, run, mnist_available):
    """The cases above are refused for what was changed in them, not for how the run was made."""
    result = resume(cli, run)
    assert result.code == 0, result.err
    assert "nothing to resume" in " ".join(result.err.split())


@pytest.mark.parametrize("metadata, message", [
    ({"layerwise.recipe": nested(100_000)}, "'layerwise.recipe' metadata is not valid JSON"),
    ({"layerwise.recipe": nested(900)}, "nests more than 32 levels"),
    ({"epoch": "abc"}, "'epoch' metadata must be a number of epochs >= 0, found 'abc'"),
    ({"epoch": "-1"}, "'epoch' metadata must be a number of epochs >= 0, found '-1'"),
], ids=["deep-recipe", "deep-recipe-900", "epoch-abc", "epoch-negative"])
def test_crafted_checkpoint_metadata_is_one_line(cli, run, metadata, message):
    resign(run / WEIGHTS_FILE, metadata)
    before = folder_snapshot(run)
    one_line_error(cli("eval", str(run / WEIGHTS_FILE)), str(run / WEIGHTS_FILE), message)
    assert folder_snapshot(run) == before


# --------------------------------------------------------------------------- 2. names


def test_a_recipe_name_with_shell_syntax_is_refused_by_validate(cli, tmp_path):
    data = tiny_recipe()
    data["name"] = "x;$(touch PWNED);`id`"
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(data))
    one_line_error(cli("validate", str(path)), "name: expected 1 to 100 characters among ASCII letters, digits")
    assert not (Path.cwd() / "PWNED").exists()


@pytest.mark.parametrize("name", ["a" * 400, "é" * 200, "x\ny", "-rf", "\x1b[31mred"],
                         ids=["400-ascii", "400-bytes-of-unicode", "newline", "leading-dash", "escape"])
def test_a_run_name_that_cannot_name_a_folder_safely_fails_in_validate(cli, name):
    one_line_error(cli("validate", "mnist_hybrid", f"name={name}"), "name: expected 1 to 100 characters")


@pytest.mark.parametrize("where", ["block", "subnetwork", "inputs"])
def test_names_with_control_characters_are_refused_everywhere_in_a_recipe(cli, tmp_path, where):
    data = tiny_recipe()
    evil = "bp\x1b]0;owned\x07\n"
    if where == "block":
        data["model"]["subnetworks"][0]["blocks"][1]["name"] = evil
    elif where == "subnetwork":
        data["model"]["subnetworks"][0]["name"] = evil
    else:
        data["model"]["subnetworks"][1]["blocks"][0]["inputs"] = [evil]
    path = tmp_path / "evil.yaml"
    path.write_text(yaml.safe_dump(data))
    one_line_error(cli("validate", str(path)), "expected printable characters only", repr(evil)[1:-1])


def test_a_checkpoint_recipe_with_an_escape_in_a_name_is_refused_without_printing_it(cli, run):
    recipe = json.loads(read_safetensors(run / WEIGHTS_FILE, "checkpoint")[1]["layerwise.recipe"])
    recipe["name"] = "tiny\x1b[2J"
    resign(run / WEIGHTS_FILE, {"layerwise.recipe": json.dumps(recipe)})
    one_line_error(cli("eval", str(run)), "its embedded recipe is not valid: name: expected 1 to 100")


def test_printed_commands_quote_their_paths(tmp_path):
    from layerwise.train_run import interrupted_message, kept_message, load_run_state, resume_command

    odd = tmp_path / "runs; touch PWNED" / "tiny-$(id)-`id`"
    assert shlex.split(resume_command(odd, None))[-1] == str(odd)
    for message in (interrupted_message(odd, 2, 1), kept_message(odd, 1, None)):
        assert shlex.split(message.split("Resume with: ")[-1].split("then: ")[-1])[3] == str(odd)
    odd.mkdir(parents=True)
    (odd / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_run_state(odd, parse_recipe(tiny_recipe(), "tiny"))
    assert shlex.split(str(info.value).split("start a new run with: ")[1]) == [
        "layerwise", "train", str(odd / "recipe.yaml")]


# --------------------------------------------------------------------------- 3. one trainer per run folder


HOLD_LOCK = """
import sys
from pathlib import Path
from layerwise.runs import lock_run
lock = lock_run(Path(sys.argv[1]))
lock.record_pid()
print("locked", flush=True)
sys.stdin.read()
"""


def hold_lock(run: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "locked"
    return process


@pytest.mark.parametrize("ending", ["exits", "killed"])
def test_a_second_trainer_is_refused_while_another_process_holds_the_run(cli, run, ending):
    holder = hold_lock(run)
    try:
        before = folder_snapshot(run)
        one_line_error(resume(cli, run), f"{run}: another layerwise process (pid {holder.pid}) is training this run")
        assert folder_snapshot(run) == before
        with pytest.raises(LayerwiseError, match="another layerwise process"):
            lock_run(run)
    finally:
        if ending == "exits":
            holder.communicate("")
        else:  # the kernel drops the lock of a killed process: never a stale lock
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    lock_run(run).release()


needs_mnist = pytest.mark.skipif(not real_mnist_present(), reason="real MNIST not under ../shared/data")


@pytest.mark.integration
@needs_mnist
def test_resume_while_the_run_still_trains_is_refused_and_the_training_finishes(cli, tmp_path):
    """The reported accident: the resume deleted the trainer's temporary file mid-write and killed it."""
    data = tiny_recipe(train_limit=2048, batch_size=16)
    data["train"]["epochs"] = 3
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    trainer = start_layerwise("train", str(recipe), "--runs-dir", str(tmp_path / "runs"), "--no-progress",
                              env=env, cwd=tmp_path)
    wait_for(tmp_path / "runs" / LATEST, trainer)
    refused = resume(cli, tmp_path / "runs" / LATEST)
    one_line_error(refused, f"another layerwise process (pid {trainer.pid}) is training this run folder")
    out, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 0, err
    run = resolve_run(None, tmp_path / "runs")
    assert [json.loads(line)["epoch"] for line in (run / METRICS_FILE).read_text().splitlines()] == [1, 2, 3]


# --------------------------------------------------------------------------- 4. a kill while a run folder is created


KILL_DURING_CREATE = """
import os, signal, sys
from pathlib import Path
import torch
import layerwise.runs as runs
from layerwise.factory import parse_recipe
from tests.helpers import tiny_recipe

where = sys.argv[2]
def kill(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
real_write = runs.write_text_atomic
if where == "before recipe.yaml":
    runs.write_text_atomic = kill
elif where == "before env.json":
    runs.git_commit = kill
elif where == "before latest":
    runs.point_latest = kill
else:  # after the link to the new run is made, before it is renamed onto latest
    real_point_latest = runs.point_latest
    def point_latest(*args):
        os.replace = kill
        real_point_latest(*args)
    runs.point_latest = point_latest
runs.create_run_dir(Path(sys.argv[1]), parse_recipe(tiny_recipe(), "tiny"), torch.device("cpu"))
"""


@pytest.mark.parametrize("where", ["before recipe.yaml", "before env.json", "before latest"])
def test_a_kill_while_a_run_folder_is_created_leaves_latest_on_a_complete_run(tmp_path, where):
    root = tmp_path / "runs"
    old, lock = create_run_dir(root, parse_recipe(tiny_recipe(), "tiny"), torch.device("cpu"))
    lock.release()
    process = subprocess.run([sys.executable, "-c", KILL_DURING_CREATE, str(root), where], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert process.returncode == -signal.SIGKILL, process.stderr
    assert (root / LATEST).resolve() == old.resolve()
    for folder in root.iterdir():
        if not folder.name.startswith("."):  # a hidden, unfinished folder may remain; nothing reads it
            assert (folder / "recipe.yaml").is_file() and (folder / "env.json").is_file(), sorted(root.iterdir())
    from layerwise.train_run import run_folder_to_resume

    assert run_folder_to_resume(resolve_run(None, root)) == old  # what --resume does first

    # The unfinished folder the kill left (none once the rename is done) goes at the next clean-up.
    hidden = sorted(p for p in root.iterdir() if p.name.startswith(".tiny-"))
    assert len(hidden) == (0 if where == "before latest" else 1), hidden
    before = folder_snapshot(old)
    assert remove_abandoned_run_folders(root) == (hidden, [])
    assert not any(p.name.startswith(".tiny-") for p in root.iterdir())
    assert folder_snapshot(old) == before and (root / LATEST).resolve() == old.resolve()  # never touched


PAUSE_DURING_CREATE = """
import sys
from pathlib import Path
import torch
import layerwise.runs as runs
from layerwise.factory import parse_recipe
from tests.helpers import tiny_recipe

real = runs.write_run_files
def pause(run, *args):
    real(run, *args)
    print(run, flush=True)
    sys.stdin.read()  # still creating the run folder, until told to go on
runs.write_run_files = pause
runs.create_run_dir(Path(sys.argv[1]), parse_recipe(tiny_recipe(), "tiny"), torch.device("cpu"))
"""


def test_an_unfinished_folder_is_left_while_its_creator_lives_and_removed_once_it_is_killed(tmp_path):
    root = tmp_path / "runs"
    creator = subprocess.Popen([sys.executable, "-c", PAUSE_DURING_CREATE, str(root)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        staging = Path(creator.stdout.readline().strip())
        assert staging.parent == root and staging.name.startswith(".tiny-") and staging.name.endswith(".tmp")
        assert (staging / LOCK_FILE).read_text().strip() == str(creator.pid)
        before = folder_snapshot(staging)
        assert remove_abandoned_run_folders(root) == ([], [])  # its creator holds the lock: it lives
        assert folder_snapshot(staging) == before
    finally:
        creator.send_signal(signal.SIGKILL)
        creator.wait()
    assert remove_abandoned_run_folders(root) == ([staging], [])  # the kernel dropped the dead creator's lock
    assert list(root.iterdir()) == []


def test_a_finishing_creator_is_not_disturbed(tmp_path):
    root = tmp_path / "runs"
    creator = subprocess.Popen([sys.executable, "-c", PAUSE_DURING_CREATE, str(root)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    staging = Path(creator.stdout.readline().strip())
    assert remove_abandoned_run_folders(root) == ([], [])
    creator.communicate("")  # goes on: renames the folder into place and points latest at it
    assert creator.returncode == 0
    run = resolve_run(None, root)
    assert not staging.exists() and run.name == staging.name[1:].split(".")[0]
    assert {p.name for p in run.iterdir()} == {"recipe.yaml", "env.json", "eval", ".lock"}


def age(path: Path, seconds: float) -> None:
    """Make ``path``'s last change ``seconds`` old (a symlink's own, not its target's)."""
    then = path.lstat().st_mtime - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_a_folder_killed_before_it_was_locked_is_removed_after_the_grace_period(tmp_path):
    root = tmp_path / "runs"
    no_lock = root / ".tiny-20260101-000000.abc123.tmp"  # killed between mkdtemp and the lock
    no_pid = root / ".tiny-20260101-000000.def456.tmp"  # killed between the lock and the pid
    for folder in (no_lock, no_pid):
        (folder / "eval").mkdir(parents=True)
    (no_pid / LOCK_FILE).write_text("")
    others = [root / ".notes.tmp", root / ".cache", root / "tiny-20260101-000000"]  # not unfinished run folders
    for folder in others:
        folder.mkdir()
        age(folder, 2 * STAGING_GRACE_SECONDS)
    assert remove_abandoned_run_folders(root) == ([], [])  # young: its creator may be locking it this instant
    for folder in (no_lock, no_pid):
        age(folder, 2 * STAGING_GRACE_SECONDS)
    assert remove_abandoned_run_folders(root) == ([no_lock, no_pid], [])
    assert sorted(root.iterdir()) == sorted(others)
    assert remove_abandoned_run_folders(tmp_path / "missing") == ([], [])


@pytest.mark.integration
@needs_mnist
def test_train_removes_the_unfinished_folders_of_killed_processes_and_says_so(cli, tmp_path):
    root = tmp_path / "runs"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_CREATE, str(root), "before env.json"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (hidden,) = root.iterdir()
    data = tiny_recipe(train_limit=256)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = cli("train", str(recipe), "--runs-dir", str(root), "--no-progress")
    assert result.code == 0, result.err
    assert (f"removed 1 unfinished run folder left in {root} by a killed layerwise process: {hidden.name}"
            in result.err.splitlines())
    assert sorted(p.name for p in root.iterdir()) == sorted([LATEST, resolve_run(None, root).name])


def free_pid() -> int:
    """A pid no process can have, now or later: one above the kernel's largest (a pid that was
    free a moment ago may be reused by then, more so with pytest-xdist workers starting processes)."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except (OSError, ValueError):  # no /proc: above the largest pid_max Linux allows (2**22)
        return 2**22 + 1


def test_a_link_left_by_a_kill_before_latest_moved_is_removed_once_its_creator_is_gone(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_CREATE, str(root), "before the rename onto latest"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (left,) = [p for p in root.iterdir() if p.name.startswith(f".{LATEST}.")]
    assert left.is_symlink() and not os.path.lexists(root / LATEST)
    dead = int(left.name.split(".")[2])  # the killed creator's pid
    in_flight = root / f".{LATEST}.{os.getpid()}.0123abcd"  # a live creator's (this process stands for it)
    in_flight.symlink_to(left.readlink())
    for link in (left, in_flight):
        age(link, 2 * LATEST_GRACE_SECONDS)
    # The killed child's pid may be reused by another process before the clean-up looks (more so
    # under pytest-xdist), and then its link rightly stays: record what the clean-up saw.
    seen: dict[int, bool] = {}
    real_process_exists = layerwise.runs.process_exists

    def process_exists(pid: int) -> bool:
        seen[pid] = real_process_exists(pid)
        return seen[pid]

    with monkeypatch.context() as patch:
        patch.setattr(layerwise.runs, "process_exists", process_exists)
        run, lock = create_run_dir(root, parse_recipe(tiny_recipe(), "tiny"), torch.device("cpu"))
        lock.release()
    assert (root / LATEST).resolve() == run.resolve()
    assert dead in seen, "the clean-up did not look at the killed creator's link"
    reused = seen[dead]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == sorted(
        [in_flight.name, *([left.name] if reused else [])])
    if reused:
        left.unlink()

    # Crafted links name a pid that no process has, so that only their age decides.
    gone = free_pid()
    young = root / f".{LATEST}.{gone}.4567cdef"  # left alone whatever its pid says: its creator may run elsewhere
    older = root / f".{LATEST}.{gone}"  # as a kill left it before the name had a random part
    for link in (young, older):
        link.symlink_to(run.name)
    age(older, 2 * LATEST_GRACE_SECONDS)
    assert remove_abandoned_latest_links(root) == [older]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == sorted([in_flight.name, young.name])


def test_a_new_run_folder_is_complete_locked_and_latest(tmp_path):
    root = tmp_path / "runs"
    run, lock = create_run_dir(root, parse_recipe(tiny_recipe(), "tiny"), torch.device("cpu"))
    with lock:
        assert (root / LATEST).resolve() == run.resolve()
        assert {p.name for p in run.iterdir()} == {"recipe.yaml", "env.json", "eval", ".lock"}
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
        umask = os.umask(0o022)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        assert run.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir would make it, not mkdtemp's 0700


# --------------------------------------------------------------------------- 5. a recipe given to eval


@pytest.mark.parametrize("name", ["x.yaml", "x.yml", "x.txt"])
def test_eval_of_a_recipe_says_it_is_a_recipe(cli, tmp_path, name):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_recipe()))
    text = one_line_error(cli("eval", str(path)), f"{path}: is a recipe, not a", "takes a run folder")
    assert "header too large" not in text


def test_eval_of_a_shipped_recipe_file_says_it_is_a_recipe(cli):
    path = REPO / "layerwise" / "recipes" / "mnist_hybrid.yaml"
    one_line_error(cli("eval", str(path)), "is a recipe, not a checkpoint", f"layerwise train {path}")


def test_eval_of_other_garbage_still_says_corrupt(cli, tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_text(textwrap.dedent("just: text\nnot: a recipe\n"))
    one_line_error(cli("eval", str(path)), "not a readable safetensors checkpoint")


# --------------------------------------------------------------------------- 6. crafted metrics.jsonl


def epoch_record(epoch: int) -> dict:
    return {"epoch": epoch, "train_acc": 0.5, "global_loss": 2.0, "blocks": {"hsic1": {"loss": -0.1}},
            "test_acc": 0.5, "test_loss": 2.0, "train_seconds": 0.1}


# Line -> what replaces it in the log of a run at epoch 3 (a whole line of text, or a record), and the
# refusal, after 'metrics.jsonl: '.
CRAFTED_METRICS = {
    "epoch-0": (1, {"epoch": 0}, "line 1: epoch: expected an epoch number of 1 or more, found 0"),
    "epoch-only": (2, {"epoch": 2}, "line 2: train_acc: expected a number in [0, 1], found no such key"),
    "epoch-skipped": (2, epoch_record(3), "line 2: epoch: expected 2 (line N holds epoch N), found 3"),
    "epoch-text": (2, {**epoch_record(2), "epoch": "2"}, "line 2: epoch: expected a number of epochs, found '2' (str)"),
    "epoch-float": (1, {**epoch_record(1), "epoch": 1.0}, "line 1: epoch: expected a number of epochs, found 1.0"),
    "accuracy-above-1": (2, {**epoch_record(2), "test_acc": 1.5},
                         "line 2: test_acc: expected a number in [0, 1], found 1.5"),
    "accuracy-nan": (1, {**epoch_record(1), "train_acc": float("nan")},
                     "line 1: train_acc: expected a number in [0, 1], found nan"),
    "accuracy-bool": (1, {**epoch_record(1), "train_acc": True},
                      "line 1: train_acc: expected a number in [0, 1], found True (bool)"),
    "validation-text": (2, {**epoch_record(2), "val_acc": "high"},
                        "line 2: val_acc: expected a number in [0, 1], found 'high'"),
    "seconds-negative": (2, {**epoch_record(2), "train_seconds": -3},
                         "line 2: train_seconds: expected a number of seconds >= 0, found -3"),
    "loss-missing": (2, {k: v for k, v in epoch_record(2).items() if k != "test_loss"},
                     "line 2: test_loss: expected a number, found no such key"),
    "blocks-missing": (1, {k: v for k, v in epoch_record(1).items() if k != "blocks"},
                       "line 1: blocks: expected a mapping of block names to metrics, found no such key"),
    "block-metric-text": (2, {**epoch_record(2), "blocks": {"hsic1": {"loss": "low"}}},
                          "line 2: blocks.hsic1.loss: expected a number, found 'low'"),
    "block-name-escape": (2, {**epoch_record(2), "blocks": {"\x1b[2J": {"loss": None}}},
                          "line 2: blocks.\\x1b[2J.loss: expected a number, found None"),
    "lr-negative": (2, {**epoch_record(2), "lr": {"local": -1}}, "line 2: lr.local: expected a learning rate >= 0"),
    "stage-seconds-short": (2, {**epoch_record(2), "stages": [["hsic1"], ["bp1", "head"]], "stage_seconds": [1.0]},
                            "line 2: stage_seconds: expected 2 numbers of seconds >= 0, one per stage"),
    "not-json": (2, '{"epoch": 2, "train_a', "line 2 is not an epoch record"),
    "deep": (1, "[" * 100_000 + "]" * 100_000, "line 1 is not an epoch record"),
}


@pytest.fixture
def logged_run(tmp_path) -> Path:
    """A run whose resume state is at epoch 3 of 3 and whose metrics.jsonl has epochs 1 and 2 (as a
    kill between the state and the log leaves it): every reader reads the log."""
    run = make_finished_run(tmp_path / "runs" / "tiny-20260101-000000", epochs=3)
    (run / METRICS_FILE).write_text("".join(json.dumps(epoch_record(epoch)) + "\n" for epoch in (1, 2)))
    return run


@pytest.mark.parametrize("command", ["compare", "plot", "resume"])
@pytest.mark.parametrize("case", sorted(CRAFTED_METRICS))
def test_a_crafted_metrics_line_is_refused_naming_line_and_key_and_nothing_changes(cli, logged_run, tmp_path,
                                                                                    case, command):
    if command == "plot":
        pytest.importorskip("matplotlib")
    line, replacement, message = CRAFTED_METRICS[case]
    path = logged_run / METRICS_FILE
    lines = path.read_text().splitlines()
    lines[line - 1] = replacement if isinstance(replacement, str) else json.dumps(replacement)
    path.write_text("\n".join(lines) + "\n")
    before = folder_snapshot(logged_run)
    out = tmp_path / "plots"
    result = {"compare": lambda: cli("compare", str(logged_run)),
              "plot": lambda: cli("plot", str(logged_run), "--out", str(out)),
              "resume": lambda: resume(cli, logged_run)}[command]()
    one_line_error(result, f"{path}: {message}", "fix that line, or delete it and the lines after it")
    assert folder_snapshot(logged_run) == before and not out.exists()


def test_the_unchanged_log_is_read_by_every_reader(cli, logged_run, tmp_path):
    """The crafted cases above differ from this log in their one line only."""
    pytest.importorskip("matplotlib")
    (row,) = json.loads(cli("compare", str(logged_run), "--json").out)
    assert row["epochs"] == 2 and row["test_acc"]["mean"] == 0.5
    assert cli("plot", str(logged_run), "--out", str(tmp_path / "plots")).code == 0
    assert [r["epoch"] for r in read_metrics(logged_run / METRICS_FILE)] == [1, 2]


def test_a_log_that_lacks_an_epoch_before_the_resume_state_is_refused(cli, logged_run):
    path = logged_run / METRICS_FILE
    path.write_text(json.dumps(epoch_record(1)) + "\n")  # epoch 2 cut off; the state is at epoch 3
    before = folder_snapshot(logged_run)
    one_line_error(resume(cli, logged_run), f"{path}: holds epoch 1, and the resume state is at epoch 3, so epoch 2 "
                                            f"is missing and the log cannot be rebuilt")
    assert folder_snapshot(logged_run) == before
