"""Learning-rate schedules and the early-stopping decision they go with.

``plateau`` (the default) needs no guess of how long training takes: linear warm-up over
``warmup_steps`` steps, then the peak rate until validation NDCG@10 has not improved for
``patience`` checks, when the rate halves; once it has halved ``halvings`` times, the next
plateau stops the run. The halvings count in total, not in a row: on a noisy validation set
(a thousand sequences) small new bests keep coming at a tiny rate, which would otherwise run
to the epoch cap for nothing. ``cosine`` is the older schedule: warm-up over
``warmup_share`` of ``epochs`` epochs, cosine decay to 10 %, stop after ``patience`` checks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from config import ConfigError, TrainConfig


class Schedule:
    """Sets the optimizer's learning rate every step and decides after each validation."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, train: TrainConfig, steps_per_epoch: int
    ) -> None:
        self.optimizer = optimizer
        self.train = train
        self.total_steps = train.epochs * steps_per_epoch
        self.step_count = 0
        self.scale = 1.0
        self.bad_checks = 0
        self.halvings = 0
        self._apply()

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""
        return self.train.lr * self._warmup_factor() * self.scale * self._cosine_factor()

    def _warmup_factor(self) -> float:
        """Linear warm-up from lr / warmup to lr."""
        if self.train.schedule == "cosine":
            warmup = max(1, round(self.train.warmup_share * self.total_steps))
        else:
            warmup = max(1, self.train.warmup_steps)
        return min(1.0, (self.step_count + 1) / warmup)

    def _cosine_factor(self) -> float:
        """Cosine decay from 1 to 0.1 after the warm-up (1 for the plateau schedule)."""
        if self.train.schedule != "cosine":
            return 1.0
        warmup = max(1, round(self.train.warmup_share * self.total_steps))
        progress = min(1.0, max(0, self.step_count - warmup) / max(1, self.total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        """After an optimizer step: the rate for the next one."""
        self.step_count += 1
        self._apply()

    def validated(self, improved: bool) -> bool:
        """Record a validation check; True when training should stop."""
        if improved:
            self.bad_checks = 0
            return False
        self.bad_checks += 1
        if self.bad_checks < self.train.patience:
            return False
        if self.train.schedule == "cosine" or self.halvings >= self.train.halvings:
            return True
        self.bad_checks, self.halvings, self.scale = 0, self.halvings + 1, self.scale / 2
        self._apply()
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain values a checkpoint stores, for an exact resume."""
        return {"schedule": self.train.schedule, "step": self.step_count, "scale": self.scale,
                "bad_checks": self.bad_checks, "halvings": self.halvings}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state_dict()``'s values, refusing another schedule's state."""
        if state.get("schedule") != self.train.schedule:
            raise ConfigError(
                f"train.schedule: the checkpoint was written with schedule "
                f"{state.get('schedule', 'cosine (an older checkpoint)')!r}, not "
                f"{self.train.schedule!r}; resume with --set train.schedule=... as it was")
        self.step_count, self.scale = int(state["step"]), float(state["scale"])
        self.bad_checks, self.halvings = int(state["bad_checks"]), int(state["halvings"])
        self._apply()
