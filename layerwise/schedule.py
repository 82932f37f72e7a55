"""Learning-rate schedules: a recipe's ``optim.schedule``, for the local and global optimizers alike.

A schedule is a closed form of the epoch. The multiplier of an optimizer's base lr (``optim.local.lr``
or ``optim.global.lr``) in the epoch after ``n`` completed ones is :func:`lr_factor`:

- warm-up (any schedule, ``warmup_epochs: W`` > 0): epoch ``k`` = 1..W trains at ``k / (W + 1)`` of
  the lr, rising linearly; the schedule proper starts at the full lr in epoch W + 1;
- ``constant``: the lr itself;
- ``step``: multiplied by ``gamma`` every ``step_size`` epochs after the warm-up;
- ``cosine``: from the lr down to ``min_lr`` along half a cosine over the epochs after the warm-up,
  reaching ``min_lr`` once the last epoch (``train.epochs``) is over.

The trainer wraps each optimizer in ``torch.optim.lr_scheduler.LambdaLR`` with this multiplier and
steps it once at the end of every ``train_epoch``. Since the lr of an epoch depends on its number
only, a resume puts the schedulers at the resume state's epoch (:func:`position`), after checking
that the learning rates saved with the optimizers are the ones the schedule gives there.

This module imports no torch at import time: recipe validation runs without it (docs/design.md,
section 5); :func:`make_scheduler` imports it when a trainer needs one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from layerwise.errors import RecipeError
from layerwise.schema import Problems, build, check, join, non_negative, positive

if TYPE_CHECKING:
    import torch


def decay_rate(value: float, path: str, problems: Problems) -> None:
    """A ``check`` for a step schedule's ``gamma``: in (0, 1], so the lr shrinks or stays."""
    if not 0.0 < value <= 1.0:
        problems.add(path, f"expected a value in (0, 1], found {value}")


@dataclass
class ScheduleConfig:
    """A recipe's ``optim.schedule``: how the learning rates change from epoch to epoch.

    The default, ``constant`` without warm-up, makes no scheduler at all, so recipes without a
    schedule train, save and log exactly as before schedules existed.
    """

    name: Literal["constant", "step", "cosine"] = "constant"
    # Epochs of linear warm-up before the schedule (any schedule): epoch k of W trains at k/(W+1) of the lr.
    warmup_epochs: int = check(non_negative, 0)
    step_size: int = check(positive, 10)  # step only: epochs between two decays
    gamma: float = check(decay_rate, 0.1)  # step only: the factor of each decay
    # cosine only: the lr reached after the last epoch, the same for optim.local and optim.global (at most
    # the lower of their lrs).
    min_lr: float = check(non_negative, 0.0)

    @property
    def is_constant(self) -> bool:
        """True when every epoch trains at the base lr: no scheduler is made."""
        return self.name == "constant" and self.warmup_epochs == 0


def lr_factor(config: ScheduleConfig, epochs_done: int, epochs: int | None, lr: float) -> float:
    """The multiplier of base lr ``lr`` in the epoch after ``epochs_done`` completed ones, in a run of
    ``epochs`` epochs (needed by ``cosine`` only). Past the last epoch, cosine stays at ``min_lr``."""
    warmup = config.warmup_epochs
    if epochs_done < warmup:
        return (epochs_done + 1) / (warmup + 1)
    after = epochs_done - warmup
    if config.name == "step":
        return config.gamma ** (after // config.step_size)
    if config.name == "cosine":
        ratio = config.min_lr / lr
        span = epochs - warmup
        progress = 1.0 if span <= 0 else min(after, span) / span
        # Written so that the first epoch after the warm-up is at exactly the lr (1 - 0).
        return 1.0 - (1.0 - ratio) * (1.0 - math.cos(math.pi * progress)) / 2.0
    return 1.0


def check_min_lr(config: ScheduleConfig, lrs: dict[str, float], path: str, problems: Problems) -> None:
    """A cosine schedule's ``min_lr`` may not exceed the lr of an optimizer it decays (``lrs``: the
    lrs by the key that sets them, for the message)."""
    if config.name != "cosine":
        return
    above = [f"{key} = {lr:g}" for key, lr in lrs.items() if config.min_lr > lr]
    if above:
        problems.add(join(path, "min_lr"), f"expected a value at most the learning rates it decays, found "
                                           f"{config.min_lr:g}, above {' and '.join(above)}")


def schedule_config(value: ScheduleConfig | dict | None, epochs: Any, lrs: dict[str, float]) -> ScheduleConfig:
    """A :class:`Trainer`'s ``schedule`` and ``epochs`` arguments, validated like a recipe's
    ``optim.schedule`` and ``train.epochs`` (``lrs`` as for :func:`check_min_lr`)."""
    problems = Problems()
    if value is None:
        config = ScheduleConfig()
    elif isinstance(value, ScheduleConfig):
        config = value
    else:
        config = build(ScheduleConfig, value, "schedule", problems)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        problems.add("epochs", f"expected a number of epochs >= 1, found {epochs!r}")
    if config is not None:
        check_min_lr(config, lrs, "schedule", problems)
        if config.name == "cosine" and epochs is None:
            problems.add("epochs", "the cosine schedule needs the number of epochs it spans: pass epochs=N")
    if problems:
        raise RecipeError("Trainer", problems.items)
    return config


def make_scheduler(optimizer: torch.optim.Optimizer, config: ScheduleConfig,
                   epochs: int | None) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that applies ``config`` to ``optimizer``, each group relative to its own lr.
    Making it sets the lrs of the first epoch."""
    from torch.optim.lr_scheduler import LambdaLR

    def multiplier(lr: float):
        # A plain function, not a partial: LambdaLR then keeps nothing of it in its state_dict.
        return lambda epochs_done: lr_factor(config, epochs_done, epochs, lr)

    return LambdaLR(optimizer, [multiplier(group["lr"]) for group in optimizer.param_groups])


def scheduled_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, epochs_done: int) -> list[float]:
    """The lrs ``scheduler`` gives its optimizer's groups after ``epochs_done`` epochs: the very
    expression ``LambdaLR`` computes when it steps there, so the floats are the same."""
    return [base * factor(epochs_done) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]


def position(scheduler: torch.optim.lr_scheduler.LambdaLR, epochs_done: int) -> None:
    """Put ``scheduler`` where ``epochs_done`` steps would have left it, and set its optimizer's lrs
    for the next epoch, as an uninterrupted run has them (a resume)."""
    lrs = scheduled_lrs(scheduler, epochs_done)
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    # One step at construction, then one per epoch; a step count above 1 also keeps torch from
    # warning that the (freshly loaded) optimizer has not stepped yet.
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": epochs_done,
                               "_step_count": epochs_done + 1, "_last_lr": list(lrs)})
