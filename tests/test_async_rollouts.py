"""Asynchronous rollouts (``rollout_mode="async"``, ``rl.async_rollouts`` over ``rl.rollout_worker``): the sync path's
draws at ``max_staleness=0``, the staleness bound, weight sync, the decoupled loss, and no hung trainer or orphaned
worker however either side ends. Each fit starts a worker process (a few seconds)."""

import faulthandler
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_rlhf import PPOModule, PromptDataModule
from lightning_rlhf.losses import decoupled_ppo_loss
from lightning_rlhf.models.lora import LoraOptions
from lightning_rlhf.rl.async_rollouts import decoupled, fresh
from lightning_rlhf.rl.engines import named_weights
from lightning_rlhf.rl.generation import Rollout
from lightning_rlhf.rl.rollout_worker import RolloutWorker, RolloutWorkerDied
from lightning_rlhf.rl.rollouts import RolloutOptions
from lightning_rlhf.rl.updates import PPOUpdates
from tests.test_critic_free import fit_rl_config
from tests.test_engines import engine_sampled_experience
from tests.test_ppo import fit, make_exports, mean_score, ppo

GRPO = {"advantage_estimator": "grpo", "num_generations": 2, "max_new_tokens": 4, "ppo_epochs": 2}
STEPS = GRPO["ppo_epochs"]  # optimiser steps per rollout (one minibatch)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[str, str]:
    return make_exports(tmp_path_factory.mktemp("async"))


def prompts(exports) -> PromptDataModule:
    return PromptDataModule(tokenizer_name_or_path=exports[0], batch_size=4, max_length=32, val_fraction=0.1)


def recording(module: PPOModule) -> list[Rollout]:
    """The rollouts ``module`` trains on, in order (every path scores them through ``score_rollout``)."""
    seen, score = [], module.score_rollout
    module.score_rollout = lambda rollout: seen.append(rollout) or score(rollout)
    return seen


class Watch(Callback):
    """Calls ``check(module)`` after every training batch while the worker runs; keeps the last ``AsyncRollouts``."""

    def __init__(self, check=lambda module, batch_idx: None) -> None:
        self.check, self.async_rollouts = check, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.async_rollouts = module.async_rollouts
        self.check(module, batch_idx)


def test_max_staleness_0_samples_exactly_the_sync_runs_rollouts(exports, tmp_path):
    """Same seed, 3 rollouts: with ``max_staleness=0`` the worker samples each rollout after the last update's weights
    reached it, from the same seeded stream, and draws the epochs' shuffles next from it as the sync path does, so
    every rollout is the sync run's token for token (the updates differ only by importance weights of exp(rounding)).
    Catches: a worker sampling with stale or unsynced weights (rollouts 2 and 3 differ), another stream or seed key,
    shuffles drawn elsewhere (the policies part after the first update), a pipeline that never waits."""
    rollouts, policies = {}, {}
    for mode in ("sync", "async"):
        module = ppo(exports, **GRPO, rollout_mode=mode, max_staleness=0, num_mini_batches=2)  # the shuffles count
        rollouts[mode] = recording(module)
        fit(module, prompts(exports), 3 * 2 * STEPS, tmp_path / mode)
        policies[mode] = dict(module.model.named_parameters())
    assert len(rollouts["sync"]) == len(rollouts["async"]) == 3
    for synchronous, asynchronous in zip(rollouts["sync"], rollouts["async"], strict=True):
        assert torch.equal(synchronous.sequences, asynchronous.sequences)
        assert torch.equal(synchronous.response_mask, asynchronous.response_mask)
    for name, parameter in policies["sync"].items():
        torch.testing.assert_close(policies["async"][name], parameter, atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize(("sync_every", "expected"), [(1, [0, 1, 1, 1, 1]), (2, None)])
def test_no_rollout_is_trained_on_more_than_max_staleness_versions_old(exports, tmp_path, sync_every, expected):
    """``max_staleness=1``, weights sent after every update: the first rollout is fresh, every later one sampled while
    the trainer updated on the one before (1 old), none dropped. Weights every 2 updates: some rollouts come back 2
    old; they are dropped, counted and sampled again, and what is trained on is never older than 1 (the versions the
    worker stamped on them). Catches: the bound not enforced, staleness counted against the worker's version instead
    of the trainer's, a pipeline that does not overlap (all 0), a dropped rollout not resampled (a hang or a miss)."""
    watch = Watch()
    module = ppo(exports, **GRPO, rollout_mode="async", max_staleness=1, sync_every=sync_every)
    trained = recording(module)
    fit(module, prompts(exports), 5 * STEPS, tmp_path, callbacks=[watch])
    staleness = watch.async_rollouts.staleness
    assert len(staleness) == len(trained) == 5
    assert max(staleness) <= 1
    if expected is not None:
        assert staleness == expected and watch.async_rollouts.dropped == 0
    else:
        assert watch.async_rollouts.dropped >= 1


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"advantage_estimator": "gae", "num_generations": 1},  # PPO with a value model
        {"lora": LoraOptions(r=4, alpha=8)},  # the worker's copy gets the merged weights
    ],
    ids=["grpo", "gae", "lora"],
)
def test_the_worker_samples_with_the_trainers_weights_and_every_async_value_logged_is_finite(
    exports, tmp_path, variant
):
    """After every update's sync the worker's copy is the policy (with LoRA, merged), parameter for parameter and
    exactly; the keys the async path adds (staleness, drops, the importance weights' mean and clipped share) and the
    engine mismatch are logged, finite; a clean end of fit stops the worker (exit status 0, not killed). GRPO, PPO
    with a value model, LoRA. Catches: a sync that skips or misnames a parameter, one the worker does not apply, a
    version that never reaches the worker, a missing key."""
    checked = []

    def same_weights(module, batch_idx):
        if module.async_rollouts.version == module.async_rollouts.worker.version:  # just synced
            copies = module.async_rollouts.worker.parameters()
            weights = dict(named_weights(module.model))
            assert copies.keys() == weights.keys()
            assert all(torch.equal(copies[name], weight) for name, weight in weights.items())
            checked.append(batch_idx)

    watch = Watch(same_weights)
    module = ppo(exports, **{**GRPO, **variant}, rollout_mode="async", max_staleness=1)
    trainer = fit(module, prompts(exports), 3 * STEPS, tmp_path, callbacks=[watch])
    assert len(checked) >= 3
    logged = trainer.logged_metrics
    for key in (
        "train/rollout/staleness",
        "train/rollout/staleness_max",
        "train/rollout/dropped",
        "train/policy/is_weight_mean",
        "train/policy/is_clipped",
        "train/rollout/logprob_diff_mean",
        "train/loss/policy",
    ):
        assert key in logged and torch.isfinite(logged[key]), key
    assert logged["train/rollout/staleness_max"] == 1
    assert 0.5 < logged["train/policy/is_weight_mean"] < 1.5
    process = watch.async_rollouts.worker.process
    assert not process.is_alive() and process.exitcode == 0
    assert module.async_rollouts is None


def test_a_killed_worker_stops_fit_within_seconds_with_one_line(exports, tmp_path):
    """The worker is SIGKILLed after the second batch: fit raises ``RolloutWorkerDied`` (an ``OSError``, so the CLI
    prints it as one line) naming the process and how to resume, within seconds, not a hang (a hard timeout dumps
    the stacks and ends the test run if it hangs). Catches: a trainer blocked on the results queue or the broadcast
    of a dead worker, a traceback instead of one line."""
    killed = {}

    def kill(module, batch_idx):
        if batch_idx == 1:
            killed["pid"], killed["at"] = module.async_rollouts.worker.process.pid, time.monotonic()
            os.kill(killed["pid"], signal.SIGKILL)

    faulthandler.dump_traceback_later(120, exit=True)
    try:
        module = ppo(exports, **GRPO, rollout_mode="async", max_staleness=1)
        with pytest.raises(RolloutWorkerDied) as raised:
            fit(module, prompts(exports), 20 * STEPS, tmp_path, callbacks=[Watch(kill)])
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert time.monotonic() - killed["at"] < 10
    message = str(raised.value)
    assert "\n" not in message and f"process {killed['pid']}" in message and "-9" in message, message
    assert "--ckpt_path last" in message and isinstance(raised.value, OSError)


@pytest.mark.parametrize(
    ("error", "raised"), [(RuntimeError("a callback fails"), RuntimeError), (KeyboardInterrupt(), SystemExit)]
)
def test_a_fit_that_fails_or_is_interrupted_ends_its_worker(exports, tmp_path, error, raised):
    """An error in the middle of fit (here a callback's), or Ctrl-C (a ``KeyboardInterrupt``, after which Lightning
    exits with status 1): the worker is gone when fit returns control. Catches: teardown only at a clean end of fit
    (the module's own hooks are not called on an exception)."""
    processes = []

    def fail(module, batch_idx):
        processes.append(module.async_rollouts.worker.process)
        raise error

    module = ppo(exports, **GRPO, rollout_mode="async", max_staleness=1)
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C from its first one on
    try:
        with pytest.raises(raised):
            fit(module, prompts(exports), 4, tmp_path, callbacks=[Watch(fail)])
    finally:
        signal.signal(signal.SIGINT, handler)
    assert not processes[0].is_alive()


def test_a_worker_that_cannot_start_says_so_in_one_line_and_gives_the_threads_back(tmp_path):
    """A policy export that is not there: the worker dies loading it, and the trainer hears so at once, in one line
    naming the stage, with its own thread count back (2 here: 1 for each side while the worker runs). Catches: a
    trainer waiting out the start timeout, a failed start that leaves the trainer on half its threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RolloutWorkerDied, match=r"died with exit code 1 while starting; its output above"):
            RolloutWorker(str(tmp_path / "missing"), "float32", RolloutOptions(), 1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


TRAINER_KILLED = """
import os, signal, sys
from lightning_rlhf.rl.rollout_worker import RolloutWorker
from lightning_rlhf.rl.rollouts import RolloutOptions
if __name__ == "__main__":
    worker = RolloutWorker(sys.argv[1], "float32", RolloutOptions(), 1)
    print(worker.process.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_trainer_killed_takes_its_worker_with_it(exports, tmp_path):
    """A process that started a worker is SIGKILLed (no teardown runs): the worker dies too, within seconds
    (PR_SET_PDEATHSIG). Catches: an orphaned worker left sampling after its trainer."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER_KILLED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with (tmp_path / "out").open("w+") as out:  # a file: a pipe would stay open as long as an orphan holds it
        done = subprocess.run([sys.executable, str(script), exports[0]], stdout=out, env=env, timeout=120)
        out.seek(0)
        pid = int(out.read().split()[0])
    assert done.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    orphaned = alive(pid)
    if orphaned:
        os.kill(pid, signal.SIGKILL)  # not left behind by a failing test
    assert not orphaned


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_async_updates_minimise_the_decoupled_loss_with_the_workers_logprobs_as_behaviour():
    """The async path moves the correction out of the advantages (``correct_for_engine`` off) into the loss:
    ``clipped_objective`` is then ``decoupled_ppo_loss(π_θ, π_prox = experience.logprobs, π_behav =
    rollout.logprobs)`` at the level asked (``none``: token, AReaL's) and the cap; the sync updates are untouched.
    Catches: the correction applied twice (advantages and loss), proximal and behaviour swapped, the cap dropped."""
    experience, policy = engine_sampled_experience()  # the rollout's log-probs: the worker's engine's
    proximal, behaviour = experience.logprobs, experience.rollout.logprobs
    sync_updates = PPOUpdates(0.2, 0.2, 0.1, 0.0, 0.0, "token_mean", 3, 1, 1)
    for level, expected_level in (("none", "token"), ("sequence", "sequence")):
        arguments = {"engine_is_correction": level, "engine_is_cap": 1.2}
        options, updates = decoupled(RolloutOptions(engine_is_correction=level), sync_updates, arguments)
        assert options.engine_is_correction == "none"
        loss, stats = updates.clipped_objective(experience, torch.arange(3), policy, None)
        expected, expected_stats = decoupled_ppo_loss(
            policy, proximal, behaviour, experience.advantages, experience.mask, 0.2, 1.2, expected_level
        )
        torch.testing.assert_close(loss, expected, atol=1e-7, rtol=0)
        assert stats["policy/is_clipped"] == expected_stats["is_clipped"] and 0 < expected_stats["is_clipped"] < 1
    plain, plain_stats = sync_updates.clipped_objective(experience, torch.arange(3), policy, None)
    assert not torch.allclose(plain, loss) and "policy/is_weight_mean" not in plain_stats


def test_fresh_is_the_bound():
    assert fresh(0, 0) and fresh(1, 1) and not fresh(1, 0) and not fresh(3, 2)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"rollout_mode": "later"}, r"rollout_mode='later' is not one of \['sync', 'async'\]"),
        ({"rollout_mode": "async", "max_staleness": -1}, r"max_staleness=-1: must be >= 0"),
        ({"rollout_mode": "async", "sync_every": 0}, r"sync_every=0: must be >= 1"),
        ({"rollout_mode": "async", "rollout_engine": "vllm"}, r"rollout_mode='async' runs rollout_engine='hf'"),
        ({"rollout_mode": "async", "objective": "dpo", "num_generations": 2}, r"with objective='clipped'"),
        ({"engine_is_correction": "token"}, r"needs rollout_engine='vllm' or rollout_mode='async'"),
    ],
)
def test_async_settings_out_of_range_are_refused_and_the_hf_correction_is_lifted_only_in_async(settings, message):
    with pytest.raises(ValueError, match=message):
        PPOModule("unused", reward_fn="tests.test_ppo.share_of_a", **settings)
    PPOModule(None, reward_fn="tests.test_ppo.share_of_a", rollout_mode="async", engine_is_correction="token")


def test_grpo_async_config_fits_through_the_cli_validating_in_between(exports, tmp_path):
    """``configs/grpo_async.yaml`` under ``python -m lightning_rlhf`` (the worker started by spawn re-imports the
    entry point: it must not run a second fit), validated after every step while the worker runs: the async keys
    beside the usual ones. Catches: validation weighting its in-trainer rollouts for an engine that is not there,
    a CLI whose spawned worker fails to start."""
    scalars = fit_rl_config("grpo_async.yaml", exports, tmp_path)
    for name in ("rollout/staleness", "rollout/staleness_max", "rollout/dropped", "policy/is_weight_mean"):
        assert f"train/{name}" in scalars, scalars
    assert "val/objective/scores" in scalars


def test_async_grpo_with_a_reward_function_learns_what_it_rewards(exports, tmp_path):
    """``test_critic_free``'s GRPO learning test (the share of "a" in responses sampled on held-out prompts, 40
    rollouts) with every rollout but the first sampled one version behind by the worker, and the decoupled loss:
    it learns as sync does (sync: 0.013 -> 0.99). Catches what stops the async path learning at all: rollouts paired
    with the wrong scores or prompts, a loss whose weights blow up. (A worker never sent weights is masked here:
    the bound drops its ever staler rollouts and syncs.)"""
    data = PromptDataModule(tokenizer_name_or_path=exports[0], batch_size=8, max_length=32, val_fraction=0.1)
    data.setup("fit")
    held_out = next(iter(data.val_dataloader()))
    L.seed_everything(0)
    module = ppo(
        (exports[0],),
        reward_fn="tests.test_ppo.share_of_a",
        advantage_estimator="grpo",
        num_generations=4,
        max_new_tokens=8,
        kl_in_reward=False,
        kl_loss_coef=0.01,
        rollout_mode="async",
        max_staleness=1,
    )
    before = mean_score(module, held_out)
    fit(module, data, 160, tmp_path)
    after = mean_score(module, held_out)
    assert after > before + 0.5, (before, after)  # measured: 0.013 -> 0.996
