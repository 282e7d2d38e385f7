"""DPOModule: exact sequence log-probs, pairs from rankings, a frozen (or precomputed) reference kept out of
checkpoints, a planted preference learned, and the shipped config run through the CLI."""

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import AutoModelForCausalLM

from lightning_rlhf import ComparisonDataModule, SFTModule
from lightning_rlhf.data.collate import ComparisonCollator
from lightning_rlhf.data.records import Record
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.losses.preference import dpo_loss
from lightning_rlhf.models.causal_lm import load_causal_lm
from lightning_rlhf.models.export import export_pretrained
from lightning_rlhf.modules.dpo import DPOModule
from lightning_rlhf.toy import toy_path
from tests.helpers import TINY_CONFIG, fit_config, straight_and_resumed

WORDS = ["abc", "hello", "xyz", "lightning", "rlhf", "qwerty", "moon", "sun", "tree", "river", "stone", "cloud"]


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory) -> str:
    """A tiny SFT model exported in Hugging Face format: what DPO starts from (read-only)."""
    torch.manual_seed(0)
    sft = SFTModule(model_config=TINY_CONFIG)
    sft.configure_model()
    return str(export_pretrained(sft.model, sft.tokenizer, tmp_path_factory.mktemp("sft") / "hf"))


def dpo(path: str, **kwargs) -> DPOModule:
    module = DPOModule(path, **kwargs)
    module.configure_model()
    return module


def planted_records(words: list[str]) -> list[dict]:
    """The planted preference: the lowercase reversal beats its UPPER and Title case versions (a tie)."""
    records = []
    for word in words:
        answer = word[::-1]
        records.append(
            {"prompt": f"Reverse: {word}\n", "responses": [answer.upper(), answer, answer.title()], "ranks": [1, 0, 1]}
        )
    return records


def make_batch(records: list[dict], max_length: int = 64) -> dict[str, torch.Tensor]:
    tokenizer = Tokenizer(load_tokenizer(None), max_length)  # the tiny export's tokenizer is the byte default
    examples = tokenizer.comparisons([Record(f"test {i}", r) for i, r in enumerate(records)])
    return ComparisonCollator(tokenizer.tokenizer.pad_token_id)(examples)


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows with their padding moved to the left."""
    out = dict(batch)
    shifts = (batch["attention_mask"] == 0).sum(-1)
    for key in ("input_ids", "attention_mask", "labels"):
        out[key] = torch.stack([row.roll(int(s)) for row, s in zip(batch[key], shifts, strict=True)])
    return out


def brute_force_logprob(model, input_ids, labels) -> torch.Tensor:
    """Σ over response tokens t of log p(token_t | tokens_<t), each from its own unpadded prefix, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for t in (labels != -100).nonzero().flatten().tolist():
        logits = model(input_ids[None, :t]).logits[0, -1]
        total += torch.log_softmax(logits, -1)[input_ids[t]]
    return total


def test_sequence_logprobs_equal_a_brute_force_token_sum_with_left_and_right_padding(sft_export):
    """Responses of different lengths (so rows are padded), empty ones included (EOS alone, as chosen and as
    rejected); the module's summed log-probs of chosen and rejected responses, from one right-padded and one
    left-padded forward, both equal the float64 token-by-token sum."""
    module = dpo(sft_export).eval()
    records = [
        {"prompt": "Reverse: lightning\n", "responses": ["gninthgil", "gnin"], "ranks": [0, 1]},
        {"prompt": "Reverse: ab\n", "responses": ["ba", "a long wrong answer"], "ranks": [0, 1]},
        {"prompt": "Reverse: xy\n", "responses": ["yx", ""], "ranks": [0, 1]},  # '': log p(EOS | prompt) alone
        {"prompt": "Reverse: q\n", "responses": ["", "qq"], "ranks": [0, 1]},  # an empty chosen
    ]
    right = make_batch(records)
    left = left_padded(right)
    assert (right["attention_mask"][:, -1] == 0).any() and (left["attention_mask"][:, 0] == 0).any()
    model64 = copy.deepcopy(module.model).double()
    with torch.no_grad():
        expected = torch.stack(
            [
                brute_force_logprob(model64, ids[m.bool()], lab[m.bool()])
                for ids, lab, m in zip(right["input_ids"], right["labels"], right["attention_mask"], strict=True)
            ]
        )
        for batch in (right, left):
            _, _, stats = module._step(batch)
            chosen, rejected = batch["pairs"].unbind(-1)
            torch.testing.assert_close(stats["logps/chosen"].double(), expected[chosen], atol=2e-5, rtol=0)
            torch.testing.assert_close(stats["logps/rejected"].double(), expected[rejected], atol=2e-5, rtol=0)


def test_loss_is_log_2_when_policy_equals_reference(sft_export):
    module = dpo(sft_export)
    loss, _, stats = module._step(make_batch(planted_records(WORDS[:4])))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["rewards/margins"].abs().max() == 0


def test_a_ranking_gives_its_ordered_pairs_and_each_prompt_weighs_the_same(sft_export):
    """Prompt 1 ranks 3 responses [1, 0, 1]: pairs (1 > 0), (1 > 2), the tie gives none. Prompt 2 ranks 2: one
    pair. The loss is mean over prompts of the mean over each prompt's pairs of -log σ(βd), with d from
    log-probs of each response computed alone (no padding, no batch)."""
    module = dpo(sft_export, beta=0.5)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # move the policy away from the reference
    records = planted_records(["moon"]) + [{"prompt": "Reverse: sun\n", "responses": ["nus", "NUS"], "ranks": [1, 0]}]
    batch = make_batch(records)
    assert batch["pairs"].tolist() == [[1, 0], [1, 2], [4, 3]]
    with torch.no_grad():
        loss, n_prompts, _ = module._step(batch)
        single = []
        for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
            row = {"input_ids": ids[m.bool()][None], "labels": lab[m.bool()][None]}
            policy = brute_force_logprob(module.model, row["input_ids"][0], row["labels"][0]).float()
            ref = brute_force_logprob(module.ref_model, row["input_ids"][0], row["labels"][0]).float()
            single.append((policy, ref))
        policy, ref = (torch.stack(v) for v in zip(*single, strict=True))
        pair_losses, _, _ = dpo_loss(policy[[1, 1, 4]], policy[[0, 2, 3]], ref[[1, 1, 4]], ref[[0, 2, 3]], beta=0.5)
    expected = ((pair_losses[0] + pair_losses[1]) / 2 + pair_losses[2]) / 2
    assert n_prompts == 2
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    assert abs(loss.item() - math.log(2)) > 1e-3


def test_nll_weight_adds_the_per_token_nll_of_each_prompts_best_responses(sft_export):
    """RPO term: prompt 1's best is row 1 (rank 0 of [1, 0, 1]), prompt 2's is row 4 (rank 0 of [1, 0]); each
    scored per token (response + EOS), averaged over the two, times the weight."""
    records = planted_records(["moon"]) + [{"prompt": "Reverse: sun\n", "responses": ["nus", "NUS"], "ranks": [1, 0]}]
    batch = make_batch(records)
    with torch.no_grad():
        plain, _, _ = dpo(sft_export)._step(batch)
        with_nll, _, stats = dpo(sft_export, nll_weight=0.5)._step(batch)
        module = dpo(sft_export)
        nll = [
            -brute_force_logprob(module.model, ids[m.bool()], lab[m.bool()]).float() / n_tokens
            for ids, lab, m, n_tokens in zip(
                batch["input_ids"][[1, 4]],
                batch["labels"][[1, 4]],
                batch["attention_mask"][[1, 4]],
                (len("noom") + 1, len("nus") + 1),
                strict=True,
            )
        ]
    torch.testing.assert_close(with_nll - plain, 0.5 * torch.stack(nll).mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats["nll"][0], torch.stack(nll).mean(), atol=1e-5, rtol=0)


def planted_datamodule(tmp_path, n_train=48, n_val=16, batch_size=8) -> ComparisonDataModule:
    from lightning_rlhf.toy.reverse import make_prompts

    words = [r["prompt"].split(": ")[1].strip() for r in make_prompts(n_train + n_val, seed=7)]
    for name, chunk in (("train", words[:n_train]), ("val", words[n_train:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted_records(chunk)))
    return ComparisonDataModule(
        train_path=str(tmp_path / "train.jsonl"),
        val_path=str(tmp_path / "val.jsonl"),
        batch_size=batch_size,
        max_length=32,
    )


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def trainer(tmp_path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(default_root_dir=tmp_path, **{**defaults, **kwargs})


def adamw(lr):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def learning_run(module, datamodule, tmp_path, preference, max_steps=36) -> tuple[dict, dict, float, float]:
    """What the planted-preference learning tests compare: the validation metrics and ``preference(module)``
    before and after ``max_steps`` of fit."""
    fit = trainer(tmp_path, max_steps=max_steps, enable_checkpointing=False, num_sanity_val_steps=0)
    before = fit.validate(module, datamodule, verbose=False)[0]
    prefers_before = preference(module)
    fit.fit(module, datamodule)
    after = fit.validate(module, datamodule, verbose=False)[0]
    return before, after, prefers_before, preference(module)


def test_precomputed_and_live_reference_give_the_same_losses(sft_export, tmp_path):
    """Same seed, same shuffled data, 8 steps: live reference and cached log-probs give the same losses step by
    step (the policy moves, so they are not all log 2), and the same validation metrics."""

    def run(precompute):
        L.seed_everything(0)
        recorder = LossRecorder()
        module = DPOModule(sft_export, beta=0.5, precompute_ref_logprobs=precompute, optimizer=adamw(3e-3))
        fit = trainer(tmp_path / str(precompute), max_steps=8, callbacks=[recorder], enable_checkpointing=False)
        fit.fit(module, planted_datamodule(tmp_path, n_train=32, n_val=8))
        return recorder.losses, fit.validate(module, planted_datamodule(tmp_path, n_train=32, n_val=8))[0], module

    live_losses, live_val, live = run(False)
    cached_losses, cached_val, cached = run(True)
    assert cached.ref_model is None and live.ref_model is not None
    assert len(cached.ref_cache) == (32 + 8) * 3  # every response of train and validation, once
    assert len(live_losses) == 8 and abs(live_losses[-1] - math.log(2)) > 0.05
    assert cached_losses == pytest.approx(live_losses, abs=1e-5)
    assert cached_val == pytest.approx(live_val, abs=1e-5)


def test_reference_stays_frozen_policy_moves_and_checkpoints_hold_no_reference(sft_export, tmp_path):
    module = dpo(sft_export, optimizer=adamw(1e-3), export_dir=str(tmp_path / "hf"))
    policy_before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    ref_before = {n: p.detach().clone() for n, p in module.ref_model.named_parameters()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=4, callbacks=[checkpoint]).fit(module, planted_datamodule(tmp_path, 16, 4, 4))

    assert not module.ref_model.training and module.model.training
    assert all(not p.requires_grad for p in module.ref_model.parameters())
    optimised = {id(p) for group in module.trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.model.parameters()}
    for name, param in module.ref_model.named_parameters():
        assert torch.equal(param, ref_before[name]), name
    for name, param in module.model.named_parameters():
        assert not torch.equal(param, policy_before[name]), f"{name} did not move"

    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert not [k for k in state if "ref_model" in k]
    assert {k for k in state if k.startswith("model.")} == {f"model.{n}" for n in module.model.state_dict()}
    # A fresh module loads it strictly; its reference is rebuilt from the SFT export, not from the checkpoint.
    restored = dpo(sft_export)
    restored.load_state_dict(state, strict=True)
    for name, param in restored.model.named_parameters():
        assert torch.equal(param, module.model.get_parameter(name))
    for name, param in restored.ref_model.named_parameters():
        assert torch.equal(param, ref_before[name])
    # Resuming through the Trainer restores it strictly too, and trains on.
    resumed = DPOModule(sft_export, optimizer=adamw(1e-3))
    trainer(tmp_path / "resume", max_steps=5).fit(
        resumed, planted_datamodule(tmp_path, 16, 4, 4), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert resumed.trainer.global_step == 5

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    input_ids = torch.tensor([list(b"Reverse: abc\n")]) + 3
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids).logits, module.model.eval()(input_ids).logits, rtol=0, atol=0)


def test_dpo_learns_a_planted_preference_on_held_out_prompts(sft_export, tmp_path):
    """Lowercase answers are preferred to UPPER / Title case. On 32 held-out prompts (64 pairs) the implicit
    reward ranks the preferred answer first and its margin grows; the policy itself comes to prefer it."""
    L.seed_everything(0)
    module = DPOModule(sft_export, beta=0.1, optimizer=adamw(3e-3))
    datamodule = planted_datamodule(tmp_path, n_train=96, n_val=32, batch_size=8)
    before, after, policy_prefers_before, policy_prefers_after = learning_run(
        module, datamodule, tmp_path, lambda m: policy_preference(m, datamodule)
    )
    print(f"held-out before: {before}, policy prefers chosen {policy_prefers_before:.2f}")
    print(f"held-out after: {after}, policy prefers chosen {policy_prefers_after:.2f}")
    assert before["val/rewards/margins"] == 0 and before["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert after["val/rewards/accuracies"] >= 0.95
    assert after["val/rewards/margins"] > 1.0
    assert after["val/loss"] < 0.5 * math.log(2)
    assert after["val/rewards/chosen"] > 0 > after["val/rewards/rejected"]
    assert policy_prefers_after >= 0.95 > policy_prefers_before


def test_dpo_learns_to_answer_rather_than_end_at_once_from_empty_rejected_responses(sft_export, tmp_path):
    """Pairs whose rejected response is empty (the model stopping at once) against the reversal: on held-out
    prompts the policy's log-prob of EOS right after the prompt falls below the reference's, the implicit reward
    ranks the answer first, and the policy itself comes to prefer answering. A data layer that refused empty
    responses could not run this at all."""
    from lightning_rlhf.toy.reverse import make_prompts

    words = [r["prompt"].split(": ")[1].strip() for r in make_prompts(48, seed=8)]
    for name, chunk in (("train", words[:32]), ("val", words[32:])):
        rows = [{"prompt": f"Reverse: {w}\n", "chosen": w[::-1], "rejected": ""} for w in chunk]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ComparisonDataModule(
        train_path=str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.jsonl"), batch_size=8, max_length=32
    )
    L.seed_everything(0)
    module = DPOModule(sft_export, beta=0.1, optimizer=adamw(3e-3))
    fit = trainer(tmp_path, max_steps=12, enable_checkpointing=False, num_sanity_val_steps=0)
    before = fit.validate(module, data, verbose=False)[0]
    fit.fit(module, data)
    after = fit.validate(module, data, verbose=False)[0]
    assert before["val/rewards/margins"] == 0
    assert after["val/rewards/rejected"] < 0 and after["val/rewards/accuracies"] >= 0.95


def policy_preference(module: DPOModule, datamodule: ComparisonDataModule) -> float:
    """Fraction of held-out pairs where the policy's own log-prob of the preferred answer is the higher."""
    wins = []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            _, _, stats = module._step(batch)
            wins.append(stats["logps/chosen"] > stats["logps/rejected"])
    return torch.cat(wins).float().mean().item()


@pytest.mark.slow
def test_dpo_config_runs_through_the_cli_with_metrics_export_and_no_reference_in_checkpoints(sft_export, tmp_path):
    assert Path(toy_path("comparisons")).exists(), "the embedded default comparisons are missing"
    events = fit_config(
        "dpo.yaml",
        tmp_path,
        f"--model.init_args.model_name_or_path={sft_export}",
        "--trainer.max_steps=6",
        "--trainer.val_check_interval=3",
        "--trainer.limit_val_batches=2",
    )
    tags = events.Tags()["scalars"]
    for stage in ("train", "val"):
        for name in (
            "loss",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
        ):
            assert f"{stage}/{name}" in tags, tags
    (checkpoint,) = (tmp_path / "tensorboard").glob("version_*/checkpoints/last.ckpt")
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert state and not [k for k in state if "ref_model" in k]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(exported.lm_head.weight, state["model.lm_head.weight"], rtol=0, atol=0)
    start = AutoModelForCausalLM.from_pretrained(sft_export)
    assert not torch.equal(exported.lm_head.weight, start.lm_head.weight)


def test_pair_layout_weighs_each_prompt_the_same_hand_computed():
    """Three prompts: A with K = 3 ranked 0, 1, 2 (rows 0-2: pairs 0>1, 0>2, 1>2), B with a tie (rows 3-4: no pair),
    C with K = 2 ranked 1, 0 (rows 5-6: pair 6>5). Two prompts have pairs, so A's three pairs weigh 1/(3·2) = 1/6
    each and C's one pair 1/(1·2) = 1/2; the best rows (better in a pair, worse in none) are 0 and 6."""
    from lightning_rlhf.modules.preference_batches import pair_layout

    batch = {
        "input_ids": torch.zeros(7, 3, dtype=torch.long),
        "response_index": torch.tensor([[0, 1, 2], [3, 4, -1], [5, 6, -1]]),
        "pairs": torch.tensor([[0, 1], [0, 2], [1, 2], [6, 5]]),
    }
    layout = pair_layout(batch)
    torch.testing.assert_close(layout["pair_weights"], torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    assert layout["best"].tolist() == [0, 6]
    assert layout["n_prompts"] == 2


@pytest.mark.gpu
@pytest.mark.parametrize("precompute", [False, True])
def test_a_dpo_step_on_a_gpu_never_waits_for_the_device(sft_export, precompute):
    """With the pair layout (and row keys) worked out on the CPU before the transfer, the loss, its backward and
    the logged statistics run without a host-device synchronisation (torch raises on one in sync debug mode)."""
    module = dpo(sft_export, nll_weight=0.5, precompute_ref_logprobs=precompute).cuda()
    batch = make_batch(planted_records(["moon", "lightning"]))
    if precompute:
        module.precompute_reference([[batch]])
    batch = module.on_before_batch_transfer(batch, 0)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _, stats = module._step(batch)
        loss.backward()
        torch.stack([values.mean() for values in stats.values()])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_resume_mid_epoch_trains_on_the_batches_the_uninterrupted_run_trained_on(sft_export, tmp_path):
    """16 comparisons in batches of 4 (4 an epoch), checkpoint after step 3, 6 steps: the resumed run trains on the
    straight run's batches 4..6 with the same losses."""

    def fit(callbacks, ckpt_path):
        L.seed_everything(0)
        module = DPOModule(sft_export, optimizer=adamw(1e-3))
        trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=callbacks).fit(
            module, planted_datamodule(tmp_path, 16, 4, 4), ckpt_path=ckpt_path
        )

    straight, resumed = straight_and_resumed(fit, ("train/loss",), 3, tmp_path)
    assert len(straight.batches) == 6 and straight.batches[4] != straight.batches[0]
    assert resumed.batches == straight.batches[3:]
    torch.testing.assert_close(resumed.metrics, straight.metrics[3:], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"beta": -1.0}, r"beta=-1.0: must be > 0"),
        ({"beta": 0.0}, r"beta=0.0: must be > 0"),
        ({"nll_weight": -0.5}, r"nll_weight=-0.5: must be >= 0"),
        ({"label_smoothing": 0.5}, r"label_smoothing=0.5: must be in \[0, 0.5\)"),
    ],
)
def test_dpo_settings_out_of_range_are_refused_naming_the_range(setting, message):
    with pytest.raises(ValueError, match=message):
        DPOModule("never/loaded/sft", **setting)


def test_dropout_is_off_in_the_policy_so_step_0_is_exactly_log_2(tmp_path):
    """A model configured with attention_dropout=0.3, the module in train mode as fit leaves it: policy and reference
    are the same weights, so the loss must be exactly log 2 and every implicit reward 0 (with dropout on in the
    policy it came out 0.6938 and the rewards non-zero)."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer(None)
    model = load_causal_lm(None, tokenizer, "float32", {**TINY_CONFIG, "attention_dropout": 0.3})
    module = dpo(str(export_pretrained(model, tokenizer, tmp_path / "hf"))).train()
    torch.manual_seed(1)
    loss, _, stats = module._step(make_batch(planted_records(WORDS[:4])))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["rewards/chosen"].abs().max() == 0 and stats["rewards/rejected"].abs().max() == 0


def test_reference_can_be_another_model_than_the_policys_start(sft_export, tmp_path):
    """Iterated DPO continues from the last round's policy against the SFT reference: with
    ``ref_model_name_or_path`` the frozen reference holds that model's weights, the policy its start's (catches the
    path ignored, or given to the policy); a reference-free loss refuses it."""
    from tests.helpers import make_tiny_export

    other = make_tiny_export(tmp_path / "other", seed=1)
    module = dpo(sft_export, ref_model_name_or_path=other)
    start, reference = (AutoModelForCausalLM.from_pretrained(path) for path in (sft_export, other))
    assert torch.equal(module.ref_model.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(module.model.lm_head.weight, start.lm_head.weight)
    assert not torch.equal(start.lm_head.weight, reference.lm_head.weight)
    with pytest.raises(ValueError, match="ref_model_name_or_path: loss_type='simpo' uses no reference"):
        DPOModule(sft_export, ref_model_name_or_path=other, loss_type="simpo")
