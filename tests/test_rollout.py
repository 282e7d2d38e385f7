"""Generation on left-padded prompts: responses masked after EOS, padding does not change what is generated, and
the static KV cache (compiled or not) samples the distribution the log-probs score."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from lightning_rlhf.data.collate import PromptCollator
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.tokens import token_logprobs
from lightning_rlhf.models.causal_lm import forward_logits, load_causal_lm
from lightning_rlhf.rl.experience import build_experience
from lightning_rlhf.rl.generation import Rollout, decode_responses, generate, mask_after_eos
from tests.helpers import caches_seen, make_tiny_gpt2_export


def test_mask_after_eos_keeps_the_first_eos_and_nothing_after():
    """EOS = 2. Row 0: a b EOS c EOS -> 1 1 1 0 0; row 1 has no EOS -> all kept; row 2 starts with EOS."""
    responses = torch.tensor([[7, 8, 2, 9, 2], [7, 8, 9, 9, 9], [2, 7, 7, 7, 7]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask_after_eos(responses, 2), expected)


def prompts_batch(tokenizer, texts):
    return PromptCollator(tokenizer.pad_token_id)([{"input_ids": tokenizer(t)["input_ids"]} for t in texts])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_greedy_generation_does_not_depend_on_left_padding(tiny_model_dir, device):
    """A short prompt generated alone and next to a much longer one (so left-padded by 20) decodes the same."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer).to(device)
    alone = {k: v.to(device) for k, v in prompts_batch(tokenizer, ["Reverse: ab\n"]).items()}
    padded = prompts_batch(tokenizer, ["Reverse: ab\n", "Reverse: " + "x" * 20 + "\n"])
    padded = {k: v.to(device) for k, v in padded.items()}
    first = generate(model, tokenizer, alone["input_ids"], alone["attention_mask"], max_new_tokens=12, temperature=0)
    second = generate(model, tokenizer, padded["input_ids"], padded["attention_mask"], max_new_tokens=12, temperature=0)
    assert decode_responses(tokenizer, first)[0] == decode_responses(tokenizer, second)[0]
    assert model.training  # restored after generation


def test_rollout_masks_and_pads_after_eos(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    batch = prompts_batch(tokenizer, ["Reverse: abc\n", "Reverse: hello\n"])
    torch.manual_seed(0)
    rollout = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], max_new_tokens=30)
    responses = rollout.responses
    assert rollout.sequences.shape[1] == batch["input_ids"].shape[1] + responses.shape[1]
    assert torch.equal(rollout.response_mask, mask_after_eos(responses, tokenizer.eos_token_id))
    assert (responses[~rollout.response_mask] == tokenizer.pad_token_id).all()
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_length :], rollout.response_mask.long())


def test_generation_ignores_the_checkpoints_own_generation_settings(tiny_model_dir):
    """A checkpoint whose generation_config.json forbids repeating any token (``no_repeat_ngram_size=1``, a
    repetition penalty of 50): greedy decoding is still the argmax of the model's logits step by step (computed
    here by hand), and sampling still repeats tokens, as the tempered distribution the log-probs score does."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer).eval()
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.repetition_penalty = 50.0
    batch = prompts_batch(tokenizer, ["Reverse: abc\n"])
    greedy = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], max_new_tokens=100, temperature=0)
    tokens = batch["input_ids"][0].tolist()
    with torch.no_grad():
        for _ in range(100):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
            if tokens[-1] == tokenizer.eos_token_id:
                break
    expected = tokens[batch["input_ids"].shape[1] :]
    assert greedy.responses[0, : len(expected)].tolist() == expected
    assert len(set(expected)) < len(expected)  # the argmax does repeat itself: the check above has teeth

    torch.manual_seed(0)
    batch = prompts_batch(tokenizer, ["Reverse: abc\n"] * 8)
    sampled = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], max_new_tokens=40)
    rows = [row[mask].tolist() for row, mask in zip(sampled.responses, sampled.response_mask, strict=True)]
    assert any(len(set(row)) < len(row) for row in rows)


GENERATION_OPTIONS = [
    pytest.param("cpu", {}, id="cpu-dynamic"),
    pytest.param("cpu", {"cache_implementation": "static"}, id="cpu-static"),
    pytest.param("cuda", {"cache_implementation": "static"}, id="cuda-static", marks=pytest.mark.gpu),
    # torch.compile's first call takes over a minute on a CPU: checked on a GPU only
    pytest.param(
        "cuda", {"cache_implementation": "static", "compile": True}, id="cuda-compiled", marks=pytest.mark.gpu
    ),
]


@pytest.mark.parametrize(("device", "options"), GENERATION_OPTIONS)
def test_recorded_logprobs_of_sampled_tokens_equal_a_teacher_forced_forward(tiny_model_dir, device, options):
    """Whatever the KV cache, the tokens are drawn from softmax(logits / T) of the very model PPO then scores: the
    log-probs recorded while sampling (T = 0.7, prompts left-padded by up to 20) equal those of one teacher-forced
    forward over prompt ⊕ response to 1e-5, on every response token, and are 0 past the mask."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer).to(device)
    seen = caches_seen(model)
    batch = prompts_batch(tokenizer, ["Reverse: ab\n", "Reverse: " + "x" * 20 + "\n", "Reverse: hello\n"] * 2)
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    torch.manual_seed(0)
    rollout = generate(
        model, tokenizer, input_ids, attention_mask, max_new_tokens=24, temperature=0.7, return_logprobs=True, **options
    )
    assert seen and set(seen) == ({StaticCache} if options else {DynamicCache})  # the option reached the model
    with torch.no_grad():
        logits = forward_logits(model, rollout.sequences, rollout.attention_mask)[:, rollout.prompt_length - 1 : -1]
        expected = token_logprobs(logits, rollout.responses, temperature=0.7) * rollout.response_mask
    assert rollout.response_mask.sum() > 40  # many tokens compared, not a handful
    torch.testing.assert_close(rollout.logprobs, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("device", "options"), GENERATION_OPTIONS[1:])
def test_greedy_decoding_is_identical_with_static_and_dynamic_cache(tiny_model_dir, device, options):
    """Greedy responses to left-padded prompts are token for token the same with the static cache (compiled or not)
    as with the dynamic one, and the static one really was used."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer).to(device)
    batch = prompts_batch(tokenizer, ["Reverse: ab\n", "Reverse: " + "x" * 20 + "\n", "Reverse: hello\n"])
    input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    dynamic = generate(model, tokenizer, input_ids, attention_mask, max_new_tokens=40, temperature=0)
    seen = caches_seen(model)
    static = generate(model, tokenizer, input_ids, attention_mask, max_new_tokens=40, temperature=0, **options)
    assert seen and set(seen) == {StaticCache}
    assert torch.equal(static.sequences, dynamic.sequences)
    assert torch.equal(static.response_mask, dynamic.response_mask)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_a_prompt_in_several_rows_is_prefilled_once_and_samples_as_with_the_usual_prefill(
    tiny_model_dir, tmp_path, architecture
):
    """Rows A, B, A, C, A, B (three distinct prompts of 4, 12 and 22 tokens, left-padded to 22; repeats not next to
    each other): generate's first forward takes the 3 distinct prompts less their last column, the next one the 6
    rows' last column only; sampled at T = 0.7 under one seed, every response equals the usual prefill's token for
    token and its recorded log-probs to 1e-5. On GPT-2 (learned absolute positions) as well as Llama (RoPE, which
    only sees position differences). Catches: positions counted from the padded row's first column (GPT-2's
    log-probs move), a row given another prompt's cache (consecutive repeats assumed), the last column in the cached
    prefix too (generate is left nothing to forward), and the sharing silently off (the forwards' shapes)."""
    directory = tiny_model_dir if architecture == "llama" else make_tiny_gpt2_export(tmp_path / "gpt2")
    tokenizer = load_tokenizer(directory)
    model = load_causal_lm(directory, tokenizer)
    a, b, c = "Reverse: ab\n", "Reverse: " + "x" * 12 + "\n", "ab"
    batch = prompts_batch(tokenizer, [a, b, a, c, a, b])
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    shapes = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    rollouts = {}
    for share in (True, False):
        torch.manual_seed(0)
        rollouts[share] = generate(
            model,
            tokenizer,
            input_ids,
            attention_mask,
            max_new_tokens=16,
            temperature=0.7,
            return_logprobs=True,
            share_prompts=share,
        )
        shapes.append(None)
    width = input_ids.size(1)
    assert shapes[:2] == [(3, width - 1), (6, 1)] and shapes[shapes.index(None) + 1] == (6, width)
    assert torch.equal(rollouts[True].sequences, rollouts[False].sequences)
    assert rollouts[True].response_mask.sum() > 30  # many sampled tokens compared
    torch.testing.assert_close(rollouts[True].logprobs, rollouts[False].logprobs, atol=1e-5, rtol=0)


def test_unknown_cache_or_compile_without_static_cache_is_refused(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    batch = prompts_batch(tokenizer, ["Reverse: ab\n"])
    args = (model, tokenizer, batch["input_ids"], batch["attention_mask"], 4)
    with pytest.raises(ValueError, match=r"cache_implementation='paged' is not one of \['dynamic', 'static'\]"):
        generate(*args, cache_implementation="paged")
    with pytest.raises(
        ValueError, match=r"compiling the decode step needs cache_implementation='static', not 'dynamic'"
    ):
        generate(*args, compile=True)


def test_advantages_are_whitened_over_response_tokens_only():
    """Two responses, 3 and 1 tokens (two padding columns); no KL (log-probs equal), values 0, γ = λ = 1, scores 1
    and 2 on each last token. GAE: row 0 A = [1, 1, 1], row 1 A = [2] (padding ignored). Over the 4 real tokens the
    mean is 1.25 and the unbiased variance ((3 · 0.25²) + 0.75²) / 3 = 0.25, so whitened row 0 = (1 − 1.25) / 0.5 =
    −0.5 each, row 1 = (2 − 1.25) / 0.5 = 1.5, padding 0. Whitening over all 6 entries (padding as zeros) would give
    mean 5/6 instead."""
    mask = torch.tensor([[True, True, True], [True, False, False]])
    sequences = torch.tensor([[9, 5, 6, 7], [9, 5, 0, 0]])
    rollout = Rollout(sequences, torch.cat([torch.ones(2, 1, dtype=torch.long), mask.long()], 1), mask, 1)
    zeros = torch.zeros(2, 3)
    experience = build_experience(
        rollout, zeros, zeros, zeros, torch.tensor([1.0, 2.0]), eos_token_id=2, kl_coef=0.1, gamma=1.0, lam=1.0
    )
    expected = torch.tensor([[-0.5, -0.5, -0.5], [1.5, 0.0, 0.0]])
    torch.testing.assert_close(experience.advantages, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(experience.returns, torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]))
