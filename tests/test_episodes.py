"""Episodes of several turns (``rl.episodes``, ``environments``): which tokens are the policy's, how the limits end an
episode, tools' errors as observations, and the advantage over the policy's tokens only."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.environments import Step, ToolEnvironment, parse_tool_calls, run_tool
from lightning_rlhf.losses.policy import gae, ppo_policy_loss, ppo_rewards
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.rl.episodes import EpisodeOptions, sample_episodes
from lightning_rlhf.rl.generation import Rollout, mask_after_eos
from lightning_rlhf.rl.layouts import PaddedRollouts, SharedRollouts
from lightning_rlhf.toy.tools import ToolEnv, question, tool_call_text
from tests.helpers import TINY_CONFIG

TOKENIZER = load_tokenizer(None)
EOS = TOKENIZER.eos_token


class ScriptedEngine:
    """An engine that "samples" the given turns: call ``k`` answers every running episode with ``turns[k]``."""

    def __init__(self, *turns: str):
        self.turns = list(turns)
        self.calls = 0

    def sync(self, model) -> None:
        pass

    def generate(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, temperature, **_) -> Rollout:
        ids = tokenizer(self.turns[self.calls], add_special_tokens=False)["input_ids"][:max_new_tokens]
        self.calls += 1
        responses = torch.tensor([ids] * len(input_ids))
        sequences = torch.cat([input_ids, responses], dim=1)
        response_mask = mask_after_eos(responses, tokenizer.eos_token_id)
        return Rollout(
            sequences, torch.cat([attention_mask, response_mask.long()], 1), response_mask, input_ids.size(1)
        )


def tiny_model():
    torch.manual_seed(0)
    return load_causal_lm(None, TOKENIZER, "float32", TINY_CONFIG)


def toy_record() -> dict:
    return {"prompt": question(1234, 5678)}


def two_turn_episode(options: EpisodeOptions | None = None) -> Rollout:
    """The toy tool task's episode: a call of ``add``, the tool's answer, then the answer."""
    engine = ScriptedEngine(tool_call_text(1234, 5678) + "\n" + EOS, "6912\n" + EOS)
    options = options or EpisodeOptions(max_new_tokens=96, max_episode_tokens=200)
    return sample_episodes(engine, tiny_model(), TOKENIZER, [ToolEnv()], [toy_record()], options)


def test_a_two_turn_episodes_mask_covers_exactly_the_policys_tokens():
    """The byte tokenizer's template renders ``<|user|>Add: 1234+5678\\n<|assistant|>`` as the prompt; the policy's
    first turn is the call, ``\\n`` and EOS; the tool's turn is ``<|tool|>6912\\n<|assistant|>`` (context); the
    policy's second turn is ``6912\\n`` and EOS. Catches: environment tokens in the mask (the
    tool's answer trained), a turn's EOS left out of it, the tool's turn not appended."""
    rollout = two_turn_episode()
    call, answer = tool_call_text(1234, 5678) + "\n", "6912\n"
    tool_turn = "<|tool|>6912\n<|assistant|>"
    region = rollout.responses[0][rollout.attention_mask[0, rollout.prompt_length :].bool()]
    mask = rollout.response_mask[0][: len(region)]
    decode = TOKENIZER.decode
    assert decode(rollout.sequences[0, : rollout.prompt_length]) == "<|user|>Add: 1234+5678\n<|assistant|>"
    assert decode(region[mask]) == call + EOS + answer + EOS
    assert decode(region[~mask]) == tool_turn
    assert decode(region) == call + EOS + tool_turn + answer + EOS
    episodes = rollout.episodes
    assert episodes.rewards.tolist() == [1.0] and episodes.turns.tolist() == [2]
    assert episodes.tool_calls.tolist() == [1] and episodes.tool_errors.tolist() == [0]
    assert episodes.truncated.tolist() == [False]


def test_an_episode_past_its_turn_limit_is_flagged_truncated_with_the_reward_it_earned():
    """One turn allowed: the call is made and answered, but there is no turn left to answer with. Catches: a
    truncated episode counted as ended, or scored by anything but its steps' rewards (0 here)."""
    rollout = two_turn_episode(EpisodeOptions(max_turns=1, max_new_tokens=96, max_episode_tokens=200))
    assert rollout.episodes.truncated.tolist() == [True]
    assert rollout.episodes.turns.tolist() == [1] and rollout.episodes.rewards.tolist() == [0.0]
    assert rollout.response_mask.sum().item() == len(tool_call_text(1234, 5678)) + 2  # the call, "\n", EOS


def test_an_episode_past_its_token_budget_ends_there_never_cut_silently():
    """A budget of 90 tokens: the call (77 tokens with "\\n" and EOS) fits, the tool's 26-token answer does not. The
    episode ends after the call, truncated; with a budget of 20 even the call is cut (no EOS), truncated too.
    Catches: an observation cut to fit, an over-budget turn kept whole."""
    rollout = two_turn_episode(EpisodeOptions(max_new_tokens=96, max_episode_tokens=90))
    assert rollout.episodes.truncated.tolist() == [True]
    assert rollout.responses.size(1) == len(tool_call_text(1234, 5678)) + 2
    cut = two_turn_episode(EpisodeOptions(max_new_tokens=96, max_episode_tokens=20))
    assert cut.episodes.truncated.tolist() == [True] and cut.response_mask.sum().item() == 20


class Failing(ToolEnvironment):
    def broken(text: str) -> str:  # noqa: N805 - a plain function, called as a tool
        """Always fails.

        Args:
            text: Anything.
        """
        raise RuntimeError("disk on fire")

    tools = (broken,)

    def reset(self, record):
        return [{"role": "user", "content": "go"}]

    def score(self, answer: str) -> float:
        return 0.5


def test_a_tool_that_raises_or_a_call_that_does_not_parse_becomes_an_error_observation_and_is_counted():
    """Three calls in one turn: a tool that raises, an unknown tool, and JSON that does not parse; each answered by
    an ``error:`` tool message, all three counted as errors, the episode going on. Catches: an exception escaping
    the environment (the run crashing), errors not counted, an unparsable call taken for an answer."""
    turn = (
        '<tool_call>{"name": "broken", "arguments": {"text": "x"}}</tool_call>'
        '<tool_call>{"name": "missing", "arguments": {}}</tool_call><tool_call>{not json</tool_call>'
    )
    step = Failing().step(turn)
    assert (step.done, step.tool_calls, step.tool_errors) == (False, 3, 3)
    contents = [message["content"] for message in step.observation]
    assert contents[0] == "error: broken raised RuntimeError: disk on fire"
    assert contents[1].startswith("error: no tool named 'missing'")
    assert contents[2].startswith("error: the tool call is not JSON")
    assert Failing().step("the answer") == Step(reward=0.5, done=True)
    assert run_tool({}, parse_tool_calls("<tool_call>{}")[0])[1]  # never closed: an error too


def test_gae_passes_over_the_environments_turn():
    """Policy tokens at columns 0, 1 and 3; column 2 is the environment's. γ = 0.5, λ = 1, rewards (0, 0, 9, 1)
    (column 2's reward is outside the mask: ignored), values (1, 2, 7, 4).

    Steps are the policy's tokens only, so column 1's next state is column 3's:
    A_3 = 1 + 0.5·0 - 4 = -3;  A_1 = 0 + 0.5·4 - 2 + 0.5·(-3) = -1.5;  A_0 = 0 + 0.5·2 - 1 + 0.5·(-1.5) = -0.75.
    Returns A + V: (0.25, 0.5, 0, 1). Catches: bootstrapping from the environment's column (V = 7) or from 0 at
    the gap (as for an episode's end), or an advantage at the environment's token."""
    rewards = torch.tensor([[0.0, 0.0, 9.0, 1.0]])
    values = torch.tensor([[1.0, 2.0, 7.0, 4.0]])
    mask = torch.tensor([[True, True, False, True]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[-0.75, -1.5, 0.0, -3.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.25, 0.5, 0.0, 1.0]]))


def test_the_score_goes_on_the_last_policy_token_not_the_last_mask_count():
    """Mask (1, 0, 1, 0): the last policy token is column 2; the count of mask tokens minus one (1) would put the
    score on the environment's column. β = 0: rewards (0, 0, 5, 0)."""
    rewards = ppo_rewards(torch.tensor([5.0]), torch.zeros(1, 4), torch.tensor([[1, 0, 1, 0]]), 0.0)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 5.0, 0.0]]))


def perturbed_loss(rollout: Rollout, column: int | None) -> Tensor:
    """The clipped surrogate of the rollout's episode (advantage 1 everywhere, against the unperturbed model's
    log-probs), with the logits that predict response column ``column`` of row 0 shifted (``None``: none)."""
    start = rollout.prompt_length
    old = PaddedRollouts().logprobs(tiny_model(), rollout.sequences, rollout.attention_mask, start, 1.0)
    model = tiny_model()

    def shift(module, args, output):
        if column is not None:  # the logits at sequence position start - 1 + column predict that column's token
            output.logits[0, -(rollout.sequences.size(1) - start + 1) + column] += torch.randn(output.logits.size(-1))
        return output

    model.register_forward_hook(shift)
    logprobs = PaddedRollouts().logprobs(model, rollout.sequences, rollout.attention_mask, start, 1.0)
    loss, _ = ppo_policy_loss(logprobs, old, torch.ones_like(logprobs), rollout.response_mask, clip_range=100.0)
    return loss.detach()


def test_perturbing_logits_at_environment_tokens_leaves_the_loss_unchanged_at_policy_tokens_it_does_not():
    """The loss is the policy's alone: logits predicting a token of the tool's turn change nothing; those predicting
    a token of the policy's turn do. Catches: environment tokens in the loss mask, and an off-by-one between logits
    and labels (the logits before a turn's first token predict it)."""
    torch.manual_seed(0)
    rollout = two_turn_episode()
    mask = rollout.response_mask[0]
    environment = int((~mask & rollout.attention_mask[0, rollout.prompt_length :].bool()).nonzero()[0])
    first_of_second_turn = int(mask[environment:].nonzero()[0]) + environment
    base = perturbed_loss(rollout, None)
    for column in range(environment, first_of_second_turn):
        torch.testing.assert_close(perturbed_loss(rollout, column), base)
    assert not torch.allclose(perturbed_loss(rollout, first_of_second_turn), base)
    assert not torch.allclose(perturbed_loss(rollout, 0), base)


def test_shared_prompt_layout_scores_episodes_as_padded_rows():
    """Two episodes of one prompt, one calling the tool and one answering: the shared-prompt layout (the prompt
    forwarded once) gives the padded rows' log-probs at every policy token. Catches: the layout dropping or
    misplacing the environment's tokens inside a response."""

    class Alternating(ScriptedEngine):
        def generate(self, model, tokenizer, input_ids, attention_mask, max_new_tokens, temperature, **_):
            rollout = super().generate(model, tokenizer, input_ids, attention_mask, max_new_tokens, temperature)
            if len(input_ids) == 2:  # the first turn: the second episode answers at once
                answer = tokenizer("6912\n" + EOS, add_special_tokens=False)["input_ids"]
                ids = rollout.sequences[1, input_ids.size(1) :].clone().fill_(tokenizer.pad_token_id)
                ids[: len(answer)] = torch.tensor(answer)
                rollout.sequences[1, input_ids.size(1) :] = ids
                rollout.response_mask[1] = mask_after_eos(ids[None], tokenizer.eos_token_id)[0]
            return rollout

    engine = Alternating(tool_call_text(1234, 5678) + "\n" + EOS, "6912\n" + EOS)
    records = [toy_record(), toy_record()]
    options = EpisodeOptions(max_new_tokens=96, max_episode_tokens=200)
    rollout = sample_episodes(engine, tiny_model(), TOKENIZER, [ToolEnv(), ToolEnv()], records, options)
    assert rollout.episodes.turns.tolist() == [2, 1] and rollout.episodes.tool_calls.tolist() == [1, 0]
    model, start = tiny_model(), rollout.prompt_length
    padded = PaddedRollouts().logprobs(model, rollout.sequences, rollout.attention_mask, start, 1.0)
    shared = SharedRollouts(TOKENIZER.pad_token_id).logprobs(
        model, rollout.sequences, rollout.attention_mask, start, 1.0
    )
    mask = rollout.response_mask
    torch.testing.assert_close(shared[mask], padded[mask], rtol=1e-4, atol=1e-5)
