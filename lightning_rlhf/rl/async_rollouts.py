"""Rollouts that overlap training, a bounded number of policy versions behind (``PPOModule(rollout_mode="async",
max_staleness=k, sync_every=m)``; the sampling process: ``rollout_worker``).

The policy version ``u`` counts the rollouts the trainer has updated on. Rollout ``i`` is asked for when its prompts
arrive, and the worker samples it with the last weights it was sent. The trainer takes the oldest rollout asked for
once ``k + 1`` are in flight, so the worker samples the next ``k`` while the trainer updates on it. A rollout sampled
at version ``v`` and taken at version ``u`` is ``u - v`` versions old (its staleness). With the weights sent after
every update (``m = 1``) no rollout is older than ``k``, and once the pipeline is full each is exactly ``k`` old
(``k = 0``: the sync path's draws, one rollout at a time). With ``m > 1`` the worker's weights lag further, so the
bound also drops rollouts: one older than ``k`` is counted, the weights are sent, and its prompts are sampled again
with them (the wait for a fresher rollout).

The updates on a rollout minimise AReaL's decoupled loss (``losses.decoupled_ppo_loss``). The clipped ratio is taken
against the trainer's own log-probs at the start of the update (the proximal policy), and each token is weighted by
``min(π_prox / π_behav, C)``, where π_behav is the worker's log-probs of the tokens it sampled (``decoupled``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_rlhf.rl.generation import Rollout
from lightning_rlhf.rl.rollout_worker import RolloutWorker, VersionedRollout
from lightning_rlhf.rl.rollouts import RolloutOptions
from lightning_rlhf.rl.updates import PPOUpdates

ROLLOUT_MODES = ("sync", "async")


def decoupled(
    options: RolloutOptions, updates: PPOUpdates, arguments: Mapping[str, Any]
) -> tuple[RolloutOptions, PPOUpdates]:
    """The async path's rollout options and updates: the correction at ``engine_is_correction``'s level (``none``:
    ``token``, AReaL's) with weights up to ``engine_is_cap`` (PPOModule's ``arguments``) moves from the experience's
    advantages (``rollouts.correct_for_engine``) into the updates' loss, whose proximal and behaviour policies differ
    by the rollout's staleness as well as by the engine's numerics. Validation, sampled in the trainer, has none."""
    level, cap = arguments["engine_is_correction"], arguments["engine_is_cap"]
    level = "token" if level == "none" else level
    return replace(options, engine_is_correction="none"), replace(updates, behaviour_level=level, behaviour_cap=cap)


def fresh(staleness: int, max_staleness: int) -> bool:
    """Whether a rollout ``staleness`` versions old may be trained on."""
    return staleness <= max_staleness


class AsyncRollouts:
    """The rollouts in flight to a ``RolloutWorker``, the policy version and what the bound has dropped.

    Attributes:
        version: policy version, the number of rollouts updated on.
        staleness: how many versions old each rollout taken was, in order.
        dropped: rollouts dropped for being older than ``max_staleness``.
    """

    def __init__(self, worker: RolloutWorker, max_staleness: int, sync_every: int) -> None:
        self.worker, self.max_staleness, self.sync_every = worker, max_staleness, sync_every
        self.pending: deque[tuple[int, tuple, dict[str, Tensor]]] = deque()  # (index, key, batch), oldest first
        self.version, self.staleness, self.dropped = 0, [], 0

    @classmethod
    def start(cls, model: nn.Module, arguments: Mapping[str, Any], options: RolloutOptions) -> AsyncRollouts:
        """A worker over the export PPOModule's ``arguments`` name, sampling as ``options`` say, sent ``model``'s
        weights as version 0."""
        worker = RolloutWorker(arguments["model_name_or_path"], arguments["dtype"], options, arguments["ppo_epochs"])
        try:
            worker.sync(model, 0)
        except BaseException:
            worker.close()
            raise
        return cls(worker, arguments["max_staleness"], arguments["sync_every"])

    def ask(self, index: int, key: tuple, batch: dict[str, Tensor]) -> None:
        """Rollout ``index`` of ``batch``'s prompts, drawn from the stream ``key``, to be sampled next."""
        self.worker.sample(index, key, batch["input_ids"], batch["attention_mask"])
        self.pending.append((index, key, batch))

    def take(self, model: nn.Module) -> tuple[VersionedRollout, dict[str, Tensor]] | None:
        """The oldest rollout in flight no more than ``max_staleness`` versions old, and its batch; ``None`` while
        the pipeline fills (``max_staleness`` or fewer in flight). A staler one is dropped and sampled again, after
        ``model``'s weights are sent."""
        if len(self.pending) <= self.max_staleness:
            return None
        while True:
            versioned = self.worker.rollout()
            index, key, batch = self.pending.popleft()
            if versioned.index != index:
                raise RuntimeError(f"the rollout worker sent rollout {versioned.index} where {index} was due")
            staleness = self.version - versioned.version
            if fresh(staleness, self.max_staleness):
                self.staleness.append(staleness)
                return versioned, batch
            self.dropped += 1
            if self.worker.version != self.version:
                self.worker.sync(model, self.version)
            self.ask(index, key, batch)

    def step(
        self, key: tuple, batch: dict[str, Tensor], model: nn.Module
    ) -> tuple[Rollout, list[Tensor], dict[str, Tensor]] | None:
        """Ask for the rollout of ``batch``, drawn from the stream ``key`` (``(seed, stream, index, rank)``), then
        ``take`` one: its rollout and epochs' group orders on ``model``'s device, and its batch; ``None`` while the
        pipeline fills."""
        self.ask(key[2], key, batch)
        if (taken := self.take(model)) is None:
            return None
        versioned, batch = taken
        device = next(model.parameters()).device
        rollout = Rollout(*(part.to(device) if isinstance(part, Tensor) else part for part in versioned.rollout))
        return rollout, [order.to(device) for order in versioned.orders], batch

    def updated(self, model: nn.Module) -> None:
        """After the updates on a rollout: a new version, whose weights go to the worker every ``sync_every``."""
        self.version += 1
        if self.version % self.sync_every == 0:
            self.worker.sync(model, self.version)

    def statistics(self) -> dict[str, Tensor]:
        """Logged: the last rollout's staleness (every sequence of a rollout has the same, so the mean over steps is
        the mean over sequences), the largest so far, the rollouts dropped so far."""
        return {
            "train/rollout/staleness": torch.tensor(float(self.staleness[-1])),
            "train/rollout/staleness_max": torch.tensor(float(max(self.staleness))),
            "train/rollout/dropped": torch.tensor(float(self.dropped)),
        }

    def close(self) -> None:
        self.worker.close()


class AsyncRolloutsLifetime(Callback):
    """Starts ``module.async_rollouts`` when training starts and ends its worker however fit ends: at its end, on an
    exception or Ctrl-C (Lightning calls callbacks', not the module's, ``on_exception``), at teardown."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            raise ValueError(
                f"rollout_mode='async' runs one trainer process, not {trainer.world_size}: use rollout_mode='sync'"
            )
        module.async_rollouts = AsyncRollouts.start(module.model, module.hparams, module.rollout_options)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, module, "fit")

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if module.async_rollouts is not None:
            module.async_rollouts, async_rollouts = None, module.async_rollouts
            async_rollouts.close()
