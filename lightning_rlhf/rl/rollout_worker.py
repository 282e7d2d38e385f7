"""The rollout worker: the hf engine in a process of its own, sampling while the trainer trains (``PPOModule``'s
``rollout_mode="async"``; the staleness bound over it: ``async_rollouts``).

The worker (``worker_main``, started by ``RolloutWorker``) holds its own copy of the policy, built from the policy's
export, and on CPU its own share of the threads. It answers the requests of one queue in the order they come:

- ``Sample``: ``num_generations`` responses per prompt, drawn from the torch generator of the seeded stream the
  trainer names (``rollouts.seeded``), as the sync path draws them; back comes a ``VersionedRollout``: the rollout
  with the engine's log-probs of its tokens (the behaviour policy), the policy version that sampled it, and the
  shuffles of its PPO epochs, drawn next from the same stream as the sync path draws them;
- ``Weights``: a new policy version, whose parameters follow one at a time (``engines.named_weights``: LoRA
  merged), broadcast from the trainer over a gloo process group of the two processes. The group is its own
  (``ProcessGroupGloo`` over a ``TCPStore``), not the default one, which Lightning and torchmetrics would use;
- ``PARAMETERS``: its parameters broadcast back in the order of the last sync, to check it;
- ``None``: stop.

Nothing can hang silently. The trainer waits for a result in short polls and checks the worker between them; a
broadcast to a dead worker fails on its socket: either way ``RolloutWorkerDied`` says in one line which process died
and how to resume. The worker dies with the process that started it (``PR_SET_PDEATHSIG``) and ``close`` ends it.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.distributed import ProcessGroupGloo, TCPStore

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.rl.engines import build_engine, named_weights
from lightning_rlhf.rl.generation import Rollout
from lightning_rlhf.rl.rollouts import RolloutOptions, sample_rollout, seeded

SPAWN = torch.multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads, locks or OpenMP pool
POLL_S = 0.2  # how often a waiting trainer checks that its worker lives
START_TIMEOUT_S = 300.0  # the worker's imports and model load
SYNC_TIMEOUT = timedelta(seconds=120)  # one broadcast, should a live worker stop answering
PARAMETERS = "parameters"
PR_SET_PDEATHSIG = 1


class Sample(NamedTuple):
    """Prompts to sample for: rollout ``index``, drawn from the stream ``seeded(key)``."""

    index: int
    key: tuple
    input_ids: Tensor
    attention_mask: Tensor


class Weights(NamedTuple):
    """Policy ``version``; ``(name, shape)`` of each parameter broadcast next, in order."""

    version: int
    shapes: list[tuple[str, torch.Size]]


class VersionedRollout(NamedTuple):
    """A rollout sampled by the worker: ``rollout.logprobs`` are the engine's (the behaviour policy), ``version`` the
    policy version it sampled with, ``orders`` the group permutations of its PPO epochs."""

    index: int
    version: int
    rollout: Rollout
    orders: list[Tensor]


@dataclass(frozen=True)
class WorkerSetup:
    """What the worker is built from: the policy's export, its dtype, how rollouts are sampled, the PPO epochs to
    shuffle for, its threads, the trainer's store and process id."""

    model_name_or_path: str
    dtype: str
    options: RolloutOptions
    ppo_epochs: int
    threads: int
    port: int
    parent: int


class RolloutWorkerDied(ChildProcessError):
    """The rollout worker ended while the trainer needed it (an ``OSError``: the CLI prints it as one line)."""


def die_with(parent: int) -> None:
    """SIGKILL this process once ``parent`` ends (Linux's PR_SET_PDEATHSIG), at once if it already has."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def process_group(port: int, rank: int) -> ProcessGroupGloo:
    """The two-process gloo group of trainer (rank 0, which holds the store) and worker (rank 1)."""
    store = TCPStore("127.0.0.1", port, 2, is_master=False, timeout=timedelta(seconds=START_TIMEOUT_S))
    return ProcessGroupGloo(store, rank, 2, SYNC_TIMEOUT)


@torch.no_grad()
def worker_main(setup: WorkerSetup, requests: Any, results: Any) -> None:
    """The worker process: build the policy copy, then answer ``requests`` on ``results`` until ``None``."""
    die_with(setup.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole terminal: the trainer ends the worker
    results.cancel_join_thread()  # stopped with results unread, exit at once
    torch.set_num_threads(setup.threads)
    tokenizer = load_tokenizer(setup.model_name_or_path)
    model = load_causal_lm(setup.model_name_or_path, tokenizer, setup.dtype).eval().requires_grad_(False)
    engine, parameters = build_engine("hf", setup.model_name_or_path, setup.dtype), dict(model.named_parameters())
    results.put("ready")
    group, version, synced = process_group(setup.port, 1), -1, []
    while (request := requests.get()) is not None:
        if isinstance(request, Weights):
            for name, shape in request.shapes:
                if name not in parameters or parameters[name].shape != shape:
                    raise ValueError(f"the policy's {name} {tuple(shape)} is not a parameter of the worker's copy")
                group.broadcast(parameters[name].data, 0).wait()
            version, synced = request.version, [name for name, _ in request.shapes]
        elif isinstance(request, Sample):
            batch = {"input_ids": request.input_ids, "attention_mask": request.attention_mask}
            with seeded(request.key, torch.device("cpu")):
                rollout = sample_rollout(engine, model, tokenizer, batch, setup.options, return_logprobs=True)
                orders = [torch.randperm(len(request.input_ids)) for _ in range(setup.ppo_epochs)]
            results.put(VersionedRollout(request.index, version, rollout, orders))
        elif request == PARAMETERS:
            for name in synced:
                group.broadcast(parameters[name].data, 1).wait()


class RolloutWorker:
    """The trainer's side of the worker: start it (``threads`` of this process's, the trainer keeping the rest),
    send it prompts and weights, take its rollouts, ``close`` it."""

    def __init__(self, model_name_or_path: str, dtype: str, options: RolloutOptions, ppo_epochs: int) -> None:
        self.trainer_threads = torch.get_num_threads()
        threads = max(1, self.trainer_threads // 2)
        torch.set_num_threads(max(1, self.trainer_threads - threads))
        store = TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
        setup = WorkerSetup(model_name_or_path, dtype, options, ppo_epochs, threads, store.port, os.getpid())
        self.requests, self.results = SPAWN.Queue(), SPAWN.Queue()
        self.process = SPAWN.Process(target=worker_main, args=(setup, self.requests, self.results), daemon=True)
        self.process.start()
        try:
            self.receive("starting", START_TIMEOUT_S)
            self.group = ProcessGroupGloo(store, 0, 2, SYNC_TIMEOUT)
        except BaseException:
            self.close()  # the threads back, the worker gone
            raise
        self.store, self.version, self.synced = store, None, []

    def died(self, doing: str) -> RolloutWorkerDied:
        self.process.join(1.0)
        return RolloutWorkerDied(
            f"the rollout worker (process {self.process.pid}) died with exit code {self.process.exitcode} while "
            f"{doing}; its output above says why: fix that and fit again with --ckpt_path last to resume"
        )

    def receive(self, doing: str, timeout_s: float | None = None) -> Any:
        """The worker's next result, checking every ``POLL_S`` that it lives (and, with ``timeout_s``, waiting no
        longer)."""
        waited = 0.0
        while timeout_s is None or waited < timeout_s:
            try:
                return self.results.get(timeout=POLL_S)
            except queue.Empty:
                if not self.process.is_alive():
                    raise self.died(doing) from None
                waited += POLL_S
            except (OSError, EOFError) as error:  # a result's tensors come from the sender's memory: it died
                raise self.died(doing) from error
        raise RolloutWorkerDied(
            f"the rollout worker (process {self.process.pid}) gave nothing for {timeout_s:.0f} s while {doing}"
        )

    def sample(self, index: int, key: tuple, input_ids: Tensor, attention_mask: Tensor) -> None:
        """Ask for rollout ``index`` of the prompts, sampled with the last weights sent."""
        self.requests.put(Sample(index, key, input_ids.cpu(), attention_mask.cpu()))

    def rollout(self) -> VersionedRollout:
        """The next rollout asked for, in the order asked."""
        return self.receive("sampling")

    def sync(self, model: nn.Module, version: int) -> None:
        """Send ``model``'s weights as policy ``version``, one parameter at a time."""
        if not self.process.is_alive():
            raise self.died("waiting for weights")
        weights = [(name, weight.detach().cpu().contiguous()) for name, weight in named_weights(model)]
        self.requests.put(Weights(version, [(name, weight.shape) for name, weight in weights]))
        self.synced = [(name, weight.shape, weight.dtype) for name, weight in weights]
        try:
            for _, weight in weights:
                self.group.broadcast(weight, 0).wait()
        except RuntimeError as error:
            raise self.died(f"receiving weights ({error})".splitlines()[0]) from error
        self.version = version

    def parameters(self) -> dict[str, Tensor]:
        """The worker's copies of the parameters of the last sync, once it has answered the requests before."""
        self.requests.put(PARAMETERS)
        received = {name: torch.empty(shape, dtype=dtype) for name, shape, dtype in self.synced}
        try:
            for tensor in received.values():
                self.group.broadcast(tensor, 1).wait()
        except RuntimeError as error:
            raise self.died("sending its parameters") from error
        return received

    def close(self) -> None:
        """Stop the worker (killed if it does not stop within seconds) and give the trainer its threads back."""
        self.requests.cancel_join_thread()  # requests a dead worker never read must not hold this process's exit
        if self.process.is_alive():
            self.requests.put(None)
            self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        torch.set_num_threads(self.trainer_threads)
