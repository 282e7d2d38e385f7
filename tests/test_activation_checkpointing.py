"""``gradient_checkpointing`` on every trained model of every stage (SFT's, the reward model, DPO's policy, PPO's
policy and value model): switched on, and exact in each layout that hands the blocks masks or position ids of its
own (padded with left padding, packed, shared prompt)."""

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer

from lightning_rlhf import DPOModule, PPOModule, RewardModule, SFTModule
from lightning_rlhf.data.collate import ComparisonCollator, DemonstrationCollator, PackedDemonstrationCollator
from lightning_rlhf.data.records import Record
from lightning_rlhf.data.shared_prompt import SharedPromptCollator
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.models.reward import load_reward_model

TOKENIZER = Tokenizer(load_tokenizer(None), 48)  # the tiny export's tokenizer is the byte default
PAD = TOKENIZER.tokenizer.pad_token_id
DEMONSTRATIONS = [("Reverse: abc\n", "cba"), ("Reverse: hello\n", "olleh"), ("Reverse: xy\n", "yx")]
COMPARISONS = [
    ("Reverse: abc\n", ["cba", "abc", "cb"], [0, 2, 1]),
    ("Reverse: hello\n", ["olleh", "hello"], [0, 1]),
]


def demonstrations(packed: bool) -> dict[str, Tensor]:
    examples = TOKENIZER.demonstrations(
        [Record(f"test {i}", {"prompt": p, "response": r}) for i, (p, r) in enumerate(DEMONSTRATIONS)]
    )
    return (PackedDemonstrationCollator(PAD, row_length=40) if packed else DemonstrationCollator(PAD))(examples)


def comparisons(shared: bool) -> dict[str, Tensor]:
    examples = TOKENIZER.comparisons(
        [Record(f"test {i}", {"prompt": p, "responses": r, "ranks": k}) for i, (p, r, k) in enumerate(COMPARISONS)]
    )
    return (SharedPromptCollator(PAD, row_length=40) if shared else ComparisonCollator(PAD))(examples)


def ppo_loss(module: PPOModule) -> Tensor:
    """Policy log-probs and values of two left-padded rollouts (3 and 5 prompt tokens, 4 response tokens)."""
    sequences = torch.tensor([[PAD, PAD, 70, 71, 72, 80, 81, 82, 83], [60, 61, 62, 63, 64, 90, 91, 92, 93]])
    mask = (sequences != PAD).long()
    logprobs, values = module.policy_outputs(sequences, mask, start=5)
    weights = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs)  # every token's gradient counts differently
    return (logprobs * weights).sum() + (values * weights).sum()


# stage → (module(gradient_checkpointing), loss(module), its trained models)
STAGES: dict[str, tuple[Callable, Callable, Callable]] = {
    "sft padded": (
        lambda path, rm, gc: SFTModule(path, gradient_checkpointing=gc),
        lambda m: m._loss(demonstrations(packed=False))[0],
        lambda m: [m.model],
    ),
    "sft packed": (
        lambda path, rm, gc: SFTModule(path, gradient_checkpointing=gc),
        lambda m: m._loss(demonstrations(packed=True))[0],
        lambda m: [m.model],
    ),
    "reward model padded": (
        lambda path, rm, gc: RewardModule(path, gradient_checkpointing=gc),
        lambda m: m._step(comparisons(shared=False))["loss"],
        lambda m: [m.model],
    ),
    "reward model shared prompt": (
        lambda path, rm, gc: RewardModule(path, gradient_checkpointing=gc),
        lambda m: m._step(comparisons(shared=True))["loss"],
        lambda m: [m.model],
    ),
    "dpo padded": (
        lambda path, rm, gc: DPOModule(path, gradient_checkpointing=gc),
        lambda m: m._step(comparisons(shared=False))[0],
        lambda m: [m.model],
    ),
    "dpo shared prompt": (
        lambda path, rm, gc: DPOModule(path, gradient_checkpointing=gc),
        lambda m: m._step(comparisons(shared=True))[0],
        lambda m: [m.model],
    ),
    "ppo": (
        lambda path, rm, gc: PPOModule(path, rm, gradient_checkpointing=gc),
        ppo_loss,
        lambda m: [m.model, m.value_model],
    ),
}


def block_calls(models: list[nn.Module]) -> list[int]:
    """One counter per model: runs of its decoder blocks' MLPs, forwards and recomputations in backward (counted in
    ``forward`` itself: torch runs no module hooks while it recomputes)."""
    counts = [0] * len(models)

    def counted(forward: Callable, index: int) -> Callable:
        def run(*args, **kwargs):
            counts[index] += 1
            return forward(*args, **kwargs)

        return run

    for index, model in enumerate(models):
        for block in model.modules():
            if isinstance(block, GradientCheckpointingLayer):
                block.mlp.forward = counted(block.mlp.forward, index)
    return counts


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("rm") / "rm"
    torch.manual_seed(1)
    tokenizer = load_tokenizer(tiny_model_dir)
    export_pretrained(load_reward_model(tiny_model_dir, tokenizer), tokenizer, directory)
    return str(directory)


@pytest.mark.parametrize("stage", STAGES)
def test_gradient_checkpointing_recomputes_every_block_and_gives_the_same_gradients(
    stage, tiny_model_dir, reward_model_dir
):
    """The stage's loss and backward from the same start (same seed: a fresh reward head is the same), with and
    without ``gradient_checkpointing``: with it every decoder block of every trained model runs twice (its forward,
    then again in backward), without it once; every gradient agrees to 1e-6.

    Mutations caught: the flag not passed on (SFT, PPO's value model: one call per block); checkpointing left off a
    trained model; a recomputation without the position ids (the packed rows' restarts, the shared prompt's
    continued positions) or without the mask (left padding, the shared prompt's block mask): other activations in
    backward than in forward, so other gradients."""
    build, loss_of, trained_of = STAGES[stage]
    calls, gradients = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = build(tiny_model_dir, reward_model_dir, checkpointing)
        module.configure_model()
        trained = trained_of(module)
        with torch.no_grad():
            loss_of(module)  # the layouts' one-time checks forward models of their own: not counted below
        counts = block_calls(trained)
        loss_of(module).backward()
        calls[checkpointing] = counts
        gradients[checkpointing] = {
            f"{i}.{name}": p.grad for i, model in enumerate(trained) for name, p in model.named_parameters()
        }
    assert all(count > 0 for count in calls[False])
    assert calls[True] == [2 * count for count in calls[False]], calls
    assert gradients[True].keys() == gradients[False].keys()
    for name, gradient in gradients[False].items():
        assert gradient is not None and gradient.abs().max() > 0, name
        torch.testing.assert_close(gradients[True][name], gradient, atol=1e-6, rtol=0, msg=name)
