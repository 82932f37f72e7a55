"""A whole training run: data, model, trainer, run folder, checkpoints and the epoch table.

:func:`train_recipe` starts a new run folder; :func:`resume_run` continues one from its last
complete epoch. Every epoch ends by writing the resume state (the commit point, see
:mod:`layerwise.resume`), then ``model.safetensors``, then a line of ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from layerwise.atomic import remove_stale_temporaries
from layerwise.checkpoint import WEIGHTS_FILE, save_checkpoint
from layerwise.data import BatchStream, load_split
from layerwise.distributed import STOP_CHECK_EVERY, Group, collective_timeout, joined
from layerwise.errors import CheckpointError, LayerwiseError, NonFiniteError, TrainingInterrupted
from layerwise.factory import dataset_spec, load_recipe, network_from_recipe
from layerwise.graph import Network
from layerwise.interrupt import StopOnInterrupt
from layerwise.pipeline import Link, Pipeline, check_pipeline_recipe, make_pipeline, recipe_stages, requested_stages
from layerwise.progress import epoch_table, progress_bar, stderr, stdout
from layerwise.recipe import Recipe
from layerwise.resume import STATE_FILE, ResumeState, first_difference, load_state, restore_state, save_state
from layerwise.runs import (
    METRICS_FILE,
    MetricsLog,
    check_unlocked,
    check_writable,
    create_run_dir,
    file_signature,
    lock_run,
    read_metrics,
    remove_abandoned_run_folders,
)
from layerwise.tensorboard_log import tensorboard_callbacks
from layerwise.trainer import Trainer, evaluate, resolve_device

EpochCallback = Callable[[Path, dict], None]
"""``callback(run_folder, record)``: told of each epoch once it is saved (its metrics.jsonl record)."""


@dataclass
class Session:
    """Everything the epoch loop needs, built identically for a new run and a resumed one."""

    recipe: Recipe
    device: torch.device
    graph: Network
    trainer: Trainer
    train_stream: BatchStream
    test_stream: BatchStream
    val_stream: BatchStream | None
    group: Group | None = None  # several processes (torchrun): this one's rank; None: one process
    callbacks: list[EpochCallback] = field(default_factory=list)  # called after each saved epoch, rank 0
    pipeline: Pipeline | None = None  # this process's stage, when the blocks are spread over processes
    link: Link | None = None  # the stage's traffic with its neighbours

    def release_other_blocks(self) -> None:
        """In a pipeline stage, drop the weights of the blocks other stages train (after any resume)."""
        if self.pipeline is not None:
            self.pipeline.release_other_blocks(self.graph)

    @property
    def is_main(self) -> bool:
        """True in the process that prints and writes the run folder (the only one, or rank 0)."""
        return self.group is None or self.group.is_main


def train_recipe(
    recipe: Recipe,
    runs_root: str | Path = "runs",
    data_root: str | Path | None = None,
    show_progress: bool = True,
    quiet: bool = False,
    callbacks: Sequence[EpochCallback] = (),
) -> Path:
    """Train ``recipe`` to the end in a new run folder, checkpointing every epoch; return the folder.

    ``quiet`` drops the per-epoch lines and the final table (for scripts running many recipes).
    ``callbacks`` are called as ``callback(run, record)`` after each epoch is saved (in rank 0
    only); an exception from one stops training there, with that epoch kept.

    Launched by torchrun, this process trains its share of every batch (see
    :mod:`layerwise.distributed`); only rank 0 creates and writes the run folder and returns
    its path, the other ranks return None.
    """
    stages = requested_stages(recipe_stages(recipe))
    with (tensorboard_callbacks(recipe) as loggers,  # train.tensorboard: a missing extra fails here, first
          joined(resolve_device(recipe.train.device), recipe.data.batch_size, stages) as group):
        session = prepare(recipe, data_root, group, stages)  # the data first: nothing is created before it is found
        session.release_other_blocks()
        if not session.is_main:  # the other ranks train in step with rank 0 and touch no file
            return run_epochs(session, None, None, [], False, True)
        session.callbacks = [*loggers, *callbacks]  # the saved epoch is logged before a callback may stop
        removed, failed = remove_abandoned_run_folders(runs_root)  # left by processes killed in create_run_dir
        if not quiet:
            for folders, what in ((removed, "removed"), (failed, "could not remove")):
                if folders:
                    stderr.print(abandoned_note(Path(runs_root), folders, what), highlight=False, soft_wrap=True)
        run, lock = create_run_dir(runs_root, recipe, session.device)  # locked: no resume may write it meanwhile
        with lock:
            if not quiet:
                processes = f" in {group.world} processes" if group is not None else ""
                stderr.print(f"[bold]{recipe.name}[/]: {session.train_stream.num_samples} training samples on "
                             f"{session.device}{processes}; run folder {run}")
            return run_epochs(session, run, MetricsLog(run / METRICS_FILE), [], show_progress, quiet)


def abandoned_note(root: Path, folders: list[Path], what: str) -> str:
    """One line naming the unfinished run folders :func:`remove_abandoned_run_folders` found."""
    from rich.markup import escape

    from layerwise.errors import printable

    names = ", ".join(folder.name for folder in folders)
    whose = "killed layerwise processes" if len(folders) > 1 else "a killed layerwise process"
    plural = "s" if len(folders) > 1 else ""
    return escape(printable(f"{what} {len(folders)} unfinished run folder{plural} left in {root} by {whose}: {names}",
                            keep_newlines=False))


def resume_run(
    run_dir: str | Path,
    data_root: str | Path | None = None,
    show_progress: bool = True,
    quiet: bool = False,
    callbacks: Sequence[EpochCallback] = (),
) -> Path | None:
    """Continue the run in ``run_dir`` from its last complete epoch, in the same folder
    (``callbacks`` as for :func:`train_recipe`).

    Weights, optimizer states, random generators and the epoch come from the resume state, so
    on the same machine, with as many processes, the finished run is bit-identical to one that
    was never interrupted. A run stopped before its first epoch ended starts again from epoch 1.

    Launched by torchrun, every rank reads the state and trains its share; rank 0 alone writes
    and returns the folder, the others return None. The process count may differ from the
    interrupted run's; ranks the state has no generator for reseed theirs (dropout masks differ).
    """
    run = run_folder_to_resume(run_dir)
    recipe = load_recipe(run / "recipe.yaml")
    stages = requested_stages(recipe_stages(recipe))
    with (tensorboard_callbacks(recipe) as loggers,  # train.tensorboard: a missing extra fails here, first
          joined(resolve_device(recipe.train.device), recipe.data.batch_size, stages) as group,
          contextlib.ExitStack() as held):
        rank = 0 if group is None else group.rank
        signature = file_signature(run / STATE_FILE)  # taken before the read: a later write is noticed below
        if rank == 0:
            state, kept = check_resumable(run, recipe)
        else:
            state, kept = load_run_state(run, recipe), []
        session = prepare(recipe, data_root, group, stages)
        if state is not None and not restore_state(state, session.graph, session.trainer.optimizers(), rank,
                                                   session.trainer.schedulers(), stage=stages > 1):
            torch.manual_seed(recipe.seed + rank + 1_000_003 * state.epoch)  # a stream no other rank uses
        if not session.is_main:  # the other ranks train in step with rank 0 and touch no file
            session.release_other_blocks()
            return run_epochs(session, None, None, [state.record] if state is not None else [], False, True)
        # Every check has passed, and nothing has changed in the folder: only now is it locked (a
        # refused command must not even add the lock file), and from here on it changes.
        lock = held.enter_context(lock_run(run))
        if file_signature(run / STATE_FILE) != signature:
            raise CheckpointError(f"{run}: another process saved an epoch in this run folder while the resume was "
                                  f"starting; run the command again")
        lock.record_pid()
        remove_stale_temporaries(run)  # left by writes that a kill cut short (the lock says none is running)
        log = MetricsLog(run / METRICS_FILE)
        history: list[dict] = []
        if state is not None:
            history = [*kept, state.record]
            # The state is written first at each epoch's end: bring the other files up to it.
            save_checkpoint(run / WEIGHTS_FILE, session.graph, recipe, state.epoch, state.record)
        session.release_other_blocks()  # only now: the checkpoint above needs every block's weights
        log.replace(history)
        session.callbacks = [*loggers, *callbacks]  # the saved epoch is logged before a callback may stop
        if not quiet:
            stderr.print(f"[bold]{recipe.name}[/]: {resume_note(run, recipe, state, group)}")
        return run_epochs(session, run, log, history, show_progress, quiet)


def run_folder_to_resume(run_dir: str | Path) -> Path:
    """The run folder ``run_dir`` names (``runs/latest`` resolved), or a clear error if it is none."""
    run = Path(run_dir)
    if run.is_symlink():  # runs/latest: name the run itself, so the printed resume command stays valid
        run = run.parent / os.readlink(run)
    if not (run / "recipe.yaml").is_file():
        raise CheckpointError(f"{run}: not a run folder (it has no recipe.yaml); --resume takes a folder "
                              f"such as runs/latest or runs/<recipe>-<time>")
    return run


def check_resumable(run: Path, recipe: Recipe) -> tuple[ResumeState | None, list[dict]]:
    """The checks of a resume that need neither the data nor the model, and change nothing in
    ``run``: the resume state and the records of ``metrics.jsonl`` before it (none when no epoch
    has completed). ``layerwise train --resume --nproc N`` makes them before it launches the
    processes too, so that a refusal is one line, as in one process, and not one per worker."""
    check_unlocked(run)  # another process trains it: say so before anything else
    state = load_run_state(run, recipe)
    check_writable(run)
    if state is None:  # the log is rewritten empty, unread
        return None, []
    return state, epochs_before(run / METRICS_FILE, state)  # read, and checked, while the folder is as it was


def resume_note(run: Path, recipe: Recipe, state: ResumeState | None, group: Group | None) -> str:
    """The line a resume prints: from where, and in how many processes."""
    done = state.epoch if state is not None else 0
    if done >= recipe.train.epochs:
        return f"{run} has all {recipe.train.epochs} epochs; nothing to resume"
    processes = 1 if group is None else group.world
    stages = requested_stages(recipe_stages(recipe))
    where = f" in {processes} processes" if processes > 1 else ""
    if state is None:
        return f"resuming {run} from epoch 1{where} (no epoch had completed)"
    note = f"resuming {run} after epoch {done} of {recipe.train.epochs}{where}"
    # Pipeline stages do not split the batch (their count changes nothing); data-parallel replicas do.
    saved_stages = len(state.record.get("stages", [])) or 1
    if state.processes // saved_stages != processes // stages:
        note += (f"; it was saved by {state.processes // saved_stages} process(es), so the batches' split and any "
                 f"dropout masks differ from an uninterrupted run")
    return note


def epochs_before(path: Path, state: ResumeState) -> list[dict]:
    """The records of ``metrics.jsonl`` before the resume state's epoch, every one of them: the
    log is written after the state, so it may lack the state's epoch (rebuilt from the state),
    never an earlier one."""
    kept = [record for record in read_metrics(path) if record["epoch"] < state.epoch]
    if len(kept) < state.epoch - 1:
        have = f"epochs 1 to {len(kept)}" if len(kept) > 1 else "epoch 1" if kept else "no epoch"
        first, last = len(kept) + 1, state.epoch - 1
        missing = f"epoch {first} is" if first == last else f"epochs {first} to {last} are"
        raise CheckpointError(f"{path}: holds {have}, and the resume state is at epoch {state.epoch}, so {missing} "
                              f"missing and the log cannot be rebuilt; restore those lines, or start a new run")
    return kept


def load_run_state(run: Path, recipe: Recipe) -> ResumeState | None:
    """The run's resume state, checked against its recipe; None when no epoch has completed."""
    path = run / STATE_FILE
    if not path.exists():
        if (run / WEIGHTS_FILE).exists():
            raise CheckpointError(f"{run}: has {WEIGHTS_FILE} but no {STATE_FILE} (a run from before resume "
                                  f"support?), so it cannot continue exactly; start a new run with: "
                                  f"layerwise train {shlex.quote(str(run / 'recipe.yaml'))}")
        return None
    state = load_state(path)
    difference = first_difference(state.recipe, recipe.to_dict())  # load_state validated it
    if difference is not None:
        raise CheckpointError(f"{path}: was saved for another recipe than {run / 'recipe.yaml'} (they differ at "
                              f"{difference}); a resume continues the recipe its run started with, so restore "
                              f"that file or start a new run")
    return state


def prepare(recipe: Recipe, data_root: str | Path | None, group: Group | None = None, stages: int = 1) -> Session:
    """Load the data and build the seeded model, trainer and batch streams.

    With a ``group``, every rank builds the same model (rank 0's weights are broadcast to be
    sure) and the same shuffled stream, of which it takes its own contiguous share of each batch.
    The last incomplete batch is dropped so that every share has the same size.

    With ``stages`` > 1 the ranks are a pipeline's stages (:mod:`layerwise.pipeline`): each builds
    the whole seeded model and the whole batch stream, and its trainer trains its own blocks only.
    """
    device = resolve_device(recipe.train.device) if group is None else group.device
    check_pipeline_recipe(recipe, stages)
    spec = dataset_spec(recipe)
    train_images, train_labels = load_split(spec, "train", data_root)
    test_images, test_labels = load_split(spec, "test", data_root)
    if recipe.data.train_limit is not None:
        train_images = train_images[: recipe.data.train_limit]
        train_labels = train_labels[: recipe.data.train_limit]
    held_out = recipe.data.validation
    if held_out >= len(train_labels):
        raise LayerwiseError(f"data.validation: {held_out} samples leave none of the {len(train_labels)} to train on")
    if held_out:
        val_images, val_labels = train_images[-held_out:], train_labels[-held_out:]
        train_images, train_labels = train_images[:-held_out], train_labels[:-held_out]

    if len(train_labels) < recipe.data.batch_size:
        # One batch bigger than the data would only allocate kernels for samples that do not exist.
        raise LayerwiseError(f"data.batch_size {recipe.data.batch_size} is more than the {len(train_labels)} training "
                             f"samples; choose at most {len(train_labels)}")

    torch.manual_seed(recipe.seed)
    graph = network_from_recipe(recipe, spec.shape, spec.num_classes).to(device)
    pipe = None
    if stages > 1:
        pipe = make_pipeline(graph, recipe, stages, device, collective_timeout(), group)
        trainer = Trainer.from_recipe(graph, recipe, group=pipe.data_group, blocks=pipe.blocks)
        group_for_data = pipe.data_group  # every stage of a replica reads the replica's share of each batch
    else:
        if group is not None:
            group.broadcast_module(graph)
        trainer = Trainer.from_recipe(graph, recipe, group=group)
        group_for_data = group
    if group is not None and group.rank:
        # Dropout draws from this generator: without a stream of its own, every rank's share
        # would get the same masks. (Rank 0 keeps the seed's stream.)
        torch.manual_seed(recipe.seed + group.rank)
    train_stream = BatchStream(
        spec, train_images, train_labels, batch_size=recipe.data.batch_size, shuffle=True,
        seed=recipe.seed, noise=recipe.data.train_noise, noise_seed=recipe.seed, device=device,
        drop_last=group_for_data is not None, shard=(0, 1) if group_for_data is None else group_for_data.shard(),
        noise_space=recipe.data.noise_space, crop_padding=recipe.data.augment.crop_padding,
        flip=recipe.data.augment.flip,
    )

    def evaluation_stream(images: torch.Tensor, labels: torch.Tensor, noise_seed: int) -> BatchStream:
        # Evaluation noise is the training noise, in the same space: the paper's "noisy train and
        # test" protocol. Augmentation is for training only.
        return BatchStream(spec, images, labels, batch_size=recipe.data.test_batch_size, shuffle=False,
                           seed=0, noise=recipe.data.train_noise, noise_seed=noise_seed, device=device,
                           noise_space=recipe.data.noise_space)

    test_stream = evaluation_stream(test_images, test_labels, noise_seed=0)
    val_stream = evaluation_stream(val_images, val_labels, noise_seed=1) if held_out else None

    session = Session(recipe, device, graph, trainer, train_stream, test_stream, val_stream, group, pipeline=pipe)
    if pipe is not None:
        session.link = Link(pipe, graph)
    return session


def run_epochs(
    session: Session, run: Path | None, log: MetricsLog | None, history: list[dict], show_progress: bool, quiet: bool
) -> Path | None:
    """Train from the epoch after ``history`` to the last, saving each; stop cleanly on Ctrl-C.

    A failure inside the loop (a NaN, a full disk) or Ctrl-C says which epoch is kept and how
    to go on; the files of the last complete epoch are never touched by a failed write.

    Ranks other than 0 (``run`` and ``log`` None) only train: rank 0 evaluates and writes with
    the same weights while they wait in the next batch's collectives.
    """
    recipe, graph, trainer = session.recipe, session.graph, session.trainer
    saved = history[-1]["epoch"] if history else 0
    epoch = saved
    show_progress = show_progress and not quiet
    say = (lambda *args: None) if quiet else stderr.print
    try:
        with StopOnInterrupt() as interrupt, progress_bar(show_progress) as bars:
            epochs = bars.add_task("epochs", total=recipe.train.epochs, completed=saved)
            asked = itertools.count()

            def stop_requested() -> bool:
                """Ctrl-C was pressed; with several processes, in any of them: all must stop at the
                same batch, or the others would wait for the missing one forever."""
                return interrupt.requested if session.group is None else session.group.any(interrupt.requested)

            def should_stop() -> bool:
                """Asked before each batch; the ranks' vote costs a collective and a host sync,
                so with several processes it is held every few batches only."""
                return (session.group is None or next(asked) % STOP_CHECK_EVERY == 0) and stop_requested()

            pipe = session.pipeline
            for epoch in range(saved + 1, recipe.train.epochs + 1):
                session.train_stream.set_epoch(epoch)
                batches = bars.add_task(f"epoch {epoch} train", total=len(session.train_stream))
                if pipe is not None:  # stages start the clock together: set-up and saving are not epoch time
                    dist.barrier()
                started = time.perf_counter()
                on_batch = lambda task=batches: bars.advance(task)  # noqa: E731
                if pipe is None:
                    summary = trainer.train_epoch(session.train_stream, on_batch=on_batch, epoch=epoch,
                                                  should_stop=should_stop)
                else:  # stages vote on Ctrl-C at the epoch's end only: a vote per batch would stall the pipeline
                    waited = session.link.waiting
                    summary = pipe.train_epoch(trainer, session.train_stream, session.link, on_batch=on_batch,
                                               epoch=epoch)
                train_seconds = time.perf_counter() - started
                bars.remove_task(batches)
                if pipe is not None:
                    epoch_end = pipeline_epoch_end(session, summary, train_seconds, session.link.waiting - waited)
                    if not session.is_main:
                        if epoch < recipe.train.epochs and stop_requested():
                            raise TrainingInterrupted(f"stopped after epoch {epoch}")
                        continue
                    summary, test, val_acc, (weights, optimizers, generators) = epoch_end
                    train_seconds = max(summary["stage_seconds"])  # the last stage to finish ends the epoch
                else:
                    # A collective, so every rank takes part; rank 0 saves them all.
                    generators = session.group.generator_states() if session.group is not None else None
                    if not session.is_main:
                        if epoch < recipe.train.epochs and stop_requested():
                            raise TrainingInterrupted(f"stopped after epoch {epoch}")
                        continue
                    testing = bars.add_task(f"epoch {epoch} test", total=len(session.test_stream))
                    test = evaluate(graph, session.test_stream, on_batch=lambda task=testing: bars.advance(task))
                    bars.remove_task(testing)
                    val_acc = evaluate(graph, session.val_stream)["acc"] if session.val_stream is not None else None
                    weights, optimizers = graph, trainer.optimizers()
                record = {"epoch": epoch, **summary, "test_acc": test["acc"], "test_loss": test["loss"],
                          "train_seconds": round(train_seconds, 3)}
                if val_acc is not None:
                    record["val_acc"] = val_acc
                # The resume state is the commit point, so it goes first (see layerwise.resume).
                save_state(run / STATE_FILE, weights, optimizers, recipe, epoch, record, generators)
                saved = epoch
                save_checkpoint(run / WEIGHTS_FILE, weights, recipe, epoch, record)
                log.append(record)
                history.append(record)
                for callback in session.callbacks:
                    callback(run, record)
                bars.advance(epochs)
                val = f", val acc {record['val_acc']:.2%}" if session.val_stream is not None else ""
                skipped = (f", {record['skipped_batches']} non-finite batches skipped"
                           if record.get("skipped_batches") else "")
                say(f"epoch {epoch}: train acc {record['train_acc']:.2%}{val}, "
                    f"test acc {record['test_acc']:.2%}, {train_seconds:.1f}s{skipped}")
                if epoch < recipe.train.epochs and stop_requested():
                    raise TrainingInterrupted(f"stopped after epoch {epoch}")
    except (KeyboardInterrupt, TrainingInterrupted):  # a second Ctrl-C, or the first at a batch boundary
        raise TrainingInterrupted(interrupted_message(run, epoch, saved, session.group)) from None
    except LayerwiseError as exc:
        if run is not None:  # a pipeline's other stages do not know the folder: the launcher's line names it
            nonfinite = recipe.train.on_nonfinite if isinstance(exc, NonFiniteError) else None
            exc.args = (f"{exc}. {kept_message(run, saved, nonfinite, session.group)}",)
        raise
    if not quiet:
        stdout.print(epoch_table(history))
        stdout.print(f"Run folder: {run}")
    return run


def pipeline_epoch_end(session: Session, summary: dict, seconds: float, waited: float):
    """A pipeline's epoch end, in every stage: gather the summary, evaluate through the stages,
    gather the state. Rank 0 gets ``(summary, test, val_acc, (weights, optimizers, generators))``."""
    pipe, graph = session.pipeline, session.graph
    merged = pipe.gather_summary(summary, seconds, seconds - waited)
    test = pipe.evaluate(graph, session.test_stream, session.link)
    val = pipe.evaluate(graph, session.val_stream, session.link) if session.val_stream is not None else None
    state = pipe.gather_state(graph, session.trainer)
    return merged, test, (val["acc"] if val is not None else None), state


def resume_command(run: Path, group: Group | None) -> str:
    """The command that continues ``run``, in as many processes as it had."""
    stages = requested_stages(1)
    replicas = group.world // stages if group is not None else 1
    processes = (f" --nproc {replicas}" if replicas > 1 else "") + (f" --stages {stages}" if stages > 1 else "")
    return f"layerwise train --resume {shlex.quote(str(run))}{processes}"  # a path may hold spaces or ;$()


def interrupted_message(run: Path, epoch: int, saved: int, group: Group | None = None) -> str:
    """What Ctrl-C left on disk, and the command that continues."""
    command = resume_command(run, group)
    if saved == epoch and saved:
        return f"stopped after epoch {saved}, which is saved in {run}. Resume with: {command}"
    if saved:
        return (f"stopped during epoch {epoch}; epoch {saved} is the last one saved in {run}, and epoch {epoch} "
                f"will be redone. Resume with: {command}")
    return f"stopped during epoch 1, before any epoch was saved. Resume with: {command} (it starts from epoch 1)"


def kept_message(run: Path, saved: int, nonfinite: str | None, group: Group | None = None) -> str:
    """What a failed run kept, and what to do next; ``nonfinite`` is the run's ``train.on_nonfinite``
    when a NaN or infinity stopped it (None for any other failure)."""
    if not saved:
        return f"No epoch had completed, so {run} holds no checkpoint"
    if nonfinite == "stop":
        return (f"The last good checkpoint (epoch {saved}) is kept in {run}; to skip such batches instead, "
                f"set train.on_nonfinite=skip in a new run")
    if nonfinite == "skip":  # skipping is what failed: a whole epoch had nothing finite to train on
        return f"The last good checkpoint (epoch {saved}) is kept in {run}"
    return f"The last complete epoch ({saved}) is kept in {run}; fix the cause, then: {resume_command(run, group)}"
