"""KTO (Ethayarajh et al. 2024) on unpaired feedback: the loss and its reference point by hand, the records, the
batches' mismatched KL rows, and ``DPOModule(loss_type="kto")`` learning from labelled completions."""

import json
import math

import pytest
import torch

from lightning_rlhf.data.records import RecordError, read_records, unpaired_from_comparison, validate_unpaired
from lightning_rlhf.losses.preference import kto_loss, kto_reference_point

LN3 = math.log(3)  # σ(ln 3) = 3/4, σ(-ln 3) = 1/4


def test_kto_loss_by_hand():
    """β = 1, z_0 = 0, every log-ratio r = ln 3 (policy -1 + ln 3 against reference -1):
    desirable: λ_D (1 - σ(ln 3)) = 2 · 1/4 = 0.5; undesirable: λ_U (1 - σ(-ln 3)) = 1.5 · 3/4 = 1.125.
    With z_0 = ln 3 both are λ (1 - σ(0)): 1.0 and 0.75. Rewards β r = ln 3 either way.
    Catches: the undesirable sign flipped (it would give 1.5 · 1/4), λ_D and λ_U swapped, z_0 ignored."""
    policy = torch.tensor([-1 + LN3, -1 + LN3])
    ref = torch.tensor([-1.0, -1.0])
    desirable = torch.tensor([True, False])
    losses, rewards = kto_loss(policy, ref, desirable, 0.0, beta=1.0, desirable_weight=2.0, undesirable_weight=1.5)
    torch.testing.assert_close(losses, torch.tensor([0.5, 1.125]))
    torch.testing.assert_close(rewards, torch.tensor([LN3, LN3]))
    losses, _ = kto_loss(
        policy, ref, desirable, torch.tensor(LN3), beta=1.0, desirable_weight=2.0, undesirable_weight=1.5
    )
    torch.testing.assert_close(losses, torch.tensor([1.0, 0.75]))


def test_kto_beta_scales_the_log_ratio():
    """β = 0.5, r = 2 ln 3, z_0 = 0: βr = ln 3, so desirable 1/4 (catches β applied after the sigmoid or not at all,
    which would give 1 - σ(2 ln 3) = 0.1)."""
    losses, rewards = kto_loss(torch.tensor([2 * LN3]), torch.tensor([0.0]), torch.tensor([1]), 0.0, beta=0.5)
    torch.testing.assert_close(losses, torch.tensor([0.25]))
    torch.testing.assert_close(rewards, torch.tensor([LN3]))


def test_kto_gradient_raises_desirable_and_lowers_undesirable_log_probs():
    """d loss / d π: negative for a desirable completion (descent raises it), positive for an undesirable one."""
    policy = torch.tensor([-2.0, -2.0], requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), 0.0)
    losses.sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]


def test_kto_reference_point_is_the_clamped_detached_mean_log_ratio():
    """Log-ratios 1.0 and 0.2 → mean 0.6; -1.0 and -0.2 → mean -0.6, clamped to 0 (a KL is never negative).
    Catches a sum instead of a mean (1.2), a missing clamp (-0.6), and a gradient leaking through z_0."""
    policy = torch.tensor([0.0, -1.0], requires_grad=True)
    point = kto_reference_point(policy, torch.tensor([-1.0, -1.2]))
    torch.testing.assert_close(point, torch.tensor(0.6))
    assert not point.requires_grad
    torch.testing.assert_close(
        kto_reference_point(torch.tensor([-1.0, -1.2]), torch.tensor([0.0, -1.0])), torch.tensor(0.0)
    )


def test_kto_refuses_non_positive_weights():
    with pytest.raises(ValueError, match="both > 0"):
        kto_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), 0.0, undesirable_weight=0.0)


# -- records ---------------------------------------------------------------------------------------------------


def test_unpaired_records_and_comparisons_read_as_kto_records(tmp_path):
    """TRL's unpaired format is read as is; a comparison as its best (desirable) and worst (undesirable) responses,
    the middle one left out. Catches the best and worst swapped, or the middle rank kept."""
    assert validate_unpaired({"prompt": "p", "completion": "", "label": False}) == {
        "prompt": "p",
        "responses": [""],
        "desirable": [0],
    }
    comparison = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 2]}
    assert validate_unpaired(comparison) == {"prompt": "p", "responses": ["b", "c"], "desirable": [1, 0]}
    assert unpaired_from_comparison(comparison) == [
        {"prompt": "p", "completion": "b", "label": True},
        {"prompt": "p", "completion": "c", "label": False},
    ]
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "x", "label": "yes"}) + "\n")
    with pytest.raises(RecordError, match=r"kto.jsonl line 1: field 'label' must be true .* got 'yes'"):
        read_records(str(path), "unpaired")
    path.write_text(json.dumps({"prompt": "p", "response": "x"}) + "\n")
    with pytest.raises(RecordError, match="line 1: fields 'completion' and 'label' are missing"):
        read_records(str(path), "unpaired")


# -- batches -----------------------------------------------------------------------------------------------------


def test_unpaired_collator_adds_one_mismatched_row_per_prompt_by_hand():
    """Record 0: prompt [1, 2], completion [3, 9] (desirable); record 1: prompt [4], completions [5, 6, 9]
    (desirable) and [7, 9] (undesirable); EOS 9, pad 0, max_length 4. Labelled rows, in order: record 0's
    completion, record 1's two. Mismatched rows, a batch of their own: record 0's prompt with record 1's first
    completion, cut to 4 tokens ([1, 2, 5, 6]), record 1's prompt [4] with record 0's completion. Labels mask the
    prompts. Catches: the mismatched row taking the record's own completion, a shift of the wrong record, no cut to
    max_length, the flags out of order with the rows, a mismatched row left among the labelled ones."""
    from lightning_rlhf.data.collate import ComparisonCollator, UnpairedCollator

    examples = [
        {"prompt_ids": [1, 2], "response_ids": [[3, 9]], "desirable": [1]},
        {"prompt_ids": [4], "response_ids": [[5, 6, 9], [7, 9]], "desirable": [1, 0]},
    ]
    batch = UnpairedCollator(ComparisonCollator(0), max_length=4)(examples)
    I = -100  # noqa: E741 - IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9], [4, 5, 6, 9], [4, 7, 9, 0]]
    assert batch["labels"].tolist() == [[I, I, 3, 9], [I, 5, 6, 9], [I, 7, 9, I]]
    assert batch["desirable"].tolist() == [1, 1, 0]
    assert batch["pairs"].shape == (0, 2)  # all tied: no pairs
    mismatched = batch["mismatched"]
    assert mismatched["input_ids"].tolist() == [[1, 2, 5, 6], [4, 3, 9, 0]]
    assert mismatched["labels"].tolist() == [[I, I, 5, 6], [I, 3, 9, I]]
    assert mismatched["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


@pytest.fixture(scope="module")
def sft_export(tmp_path_factory):
    from tests.test_dpo import sft_export as make

    return make.__wrapped__(tmp_path_factory)


def planted_unpaired(tmp_path, shared_prompt=False, **kwargs):
    """test_dpo's planted comparisons (the lowercase reversal best, UPPER and Title case tied worst) read as KTO
    records: per prompt one desirable completion and two undesirable ones."""
    from lightning_rlhf.data.datamodules import UnpairedDataModule
    from tests.test_dpo import planted_datamodule

    tmp_path.mkdir(parents=True, exist_ok=True)
    planted = planted_datamodule(tmp_path, **kwargs).hparams
    return UnpairedDataModule(
        train_path=planted.train_path,
        val_path=planted.val_path,
        batch_size=planted.batch_size,
        max_length=planted.max_length,
        shared_prompt=shared_prompt,
    )


def test_kto_step_is_the_same_in_the_shared_prompt_layout_and_refuses_pairs(sft_export, tmp_path):
    """The same records give the same KTO loss and reference point padded or with each prompt once (the layout is
    exact per response); a comparison batch is refused with what to use instead, and so is KTO's for sigmoid."""
    from lightning_rlhf.modules.dpo import DPOModule
    from tests.test_dpo import planted_datamodule

    module = DPOModule(sft_export, loss_type="kto", beta=0.5)
    module.configure_model()
    with torch.no_grad():
        module.model.lm_head.weight.add_(0.05 * torch.randn_like(module.model.lm_head.weight))  # π ≠ π_ref
    steps = []
    for shared in (False, True):
        data = planted_unpaired(tmp_path / str(shared), shared_prompt=shared, n_train=16, n_val=8)
        data.setup("fit")
        with torch.no_grad():
            steps.append(module._step(next(iter(data.train_dataloader()))))
    (padded_loss, n, padded), (shared_loss, _, shared) = steps
    assert n == 8 * 3  # every labelled completion of the batch's 8 prompts counts, the mismatched rows do not
    torch.testing.assert_close(shared_loss, padded_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared["kl"], padded["kl"], atol=1e-5, rtol=1e-5)
    (tmp_path / "pairs").mkdir()
    comparisons = planted_datamodule(tmp_path / "pairs", n_train=16, n_val=8)
    comparisons.setup("fit")
    with pytest.raises(
        ValueError, match="loss_type='kto' learns from unpaired feedback: give it an UnpairedDataModule"
    ):
        module._step(next(iter(comparisons.train_dataloader())))
    sigmoid = DPOModule(sft_export)
    with pytest.raises(ValueError, match="loss_type='sigmoid' learns from pairs: give it a ComparisonDataModule"):
        sigmoid._step(next(iter(data.train_dataloader())))


def summed_logprobs(model, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: ``(n,)`` summed log-probs of each padded row's labelled tokens (logits at t score token t + 1), and
    their counts."""
    logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits[:, :-1].float()
    targets, scored = rows["labels"][:, 1:], rows["labels"][:, 1:] != -100
    logps = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (logps * scored).sum(-1), scored.sum(-1)


def one_forward_kto_loss(module, batch, beta, desirable_weight, undesirable_weight, nll_weight) -> torch.Tensor:
    """KTO's loss as it was computed before the mismatched rows got a no-grad forward of their own: the labelled and
    the mismatched rows of a padded batch in one forward, with autograd, policy and reference (the adapter-off
    policy under LoRA); z_0 = max(0, mean log-ratio of the mismatched rows), detached; per completion
    λ_D (1 - σ(β(r - z_0))) or λ_U (1 - σ(β(z_0 - r))), averaged, plus nll_weight · the desirable completions' mean
    per-token NLL."""
    from lightning_rlhf.data.collate import pad

    n, mismatched = len(batch["input_ids"]), batch["mismatched"]
    together = {  # (n + m, t): the labelled rows, then the mismatched ones, right-padded to the longer width
        key: pad([*batch[key].tolist(), *mismatched[key].tolist()], fill)
        for key, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100))
    }
    logps, counts = summed_logprobs(module.model, together)
    if module.ref_model is None:  # LoRA: the reference is the policy with its adapter off
        with torch.no_grad(), module.model.disable_adapter():
            ref_logps, _ = summed_logprobs(module.model, together)
    else:
        with torch.no_grad():
            ref_logps, _ = summed_logprobs(module.ref_model, together)
    ratios = logps - ref_logps
    point = ratios[n:].detach().mean().clamp(min=0)
    good = batch["desirable"].bool()
    value = torch.sigmoid(beta * torch.where(good, ratios[:n] - point, point - ratios[:n]))
    losses = torch.where(good, desirable_weight, undesirable_weight) * (1 - value)
    nll = -(logps[:n] / counts[:n])[good].mean()
    return losses.mean() + nll_weight * nll


@pytest.mark.parametrize("variant", ["padded", "shared", "lora"])
def test_kto_forwards_the_mismatched_rows_without_autograd_and_keeps_loss_and_gradient(
    sft_export, tmp_path, monkeypatch, variant
):
    """On 4 planted records (12 labelled completions, 4 mismatched rows), with π ≠ π_ref and z_0 > 0 (so the
    mismatched rows decide the loss): the module's loss and its gradient with respect to every trained parameter
    equal ``one_forward_kto_loss``'s (everything through autograd in one forward), padded, in the shared-prompt
    layout (the hand computation on the padded batch of the same records), and under LoRA (the reference the
    adapter-off policy); and the mismatched rows' log-probs, policy and reference, carry no ``grad_fn``, while the
    labelled rows' policy log-probs do. Catches: the no-grad forward of the mismatched rows dropped (their
    activations kept for backward again), z_0 taken over the wrong rows or the labelled rows scored without autograd
    (loss or gradient), a mismatched row left among the labelled ones."""
    from lightning_rlhf.data.collate import ComparisonCollator, UnpairedCollator
    from lightning_rlhf.models import shared_forward
    from lightning_rlhf.models.lora import LoraOptions
    from lightning_rlhf.modules import dpo
    from lightning_rlhf.modules.dpo import DPOModule

    options = dict(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5, nll_weight=0.5)
    lora = LoraOptions(r=4, alpha=8) if variant == "lora" else None
    module = DPOModule(sft_export, loss_type="kto", lora=lora, **options)
    module.configure_model()
    data = planted_unpaired(tmp_path, shared_prompt=variant == "shared", n_train=8, n_val=4)
    data.setup("fit")
    examples = [data.train_examples[i] for i in range(4)]
    padded = UnpairedCollator(ComparisonCollator(data.tokenizer.pad_token_id), data.hparams.max_length)(examples)
    batch = data.collator()(examples)
    trained = [p for p in module.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    for _ in range(3):  # π moved towards the mismatched completions: π ≠ π_ref and z_0 > 0
        optimizer.zero_grad()
        (-summed_logprobs(module.model, padded["mismatched"])[0].mean()).backward()
        optimizer.step()

    forwards = []  # per forward the step makes: (of the mismatched rows, its log-probs carry a grad_fn)
    forward = shared_forward.response_logprobs

    def spy(model, rows):
        logps, counts = forward(model, rows)
        forwards.append((rows is batch["mismatched"], logps.grad_fn is not None))
        return logps, counts

    monkeypatch.setattr(dpo, "response_logprobs", spy)
    loss, n, stats = module._step(batch)
    monkeypatch.undo()
    grads = torch.autograd.grad(loss, trained)
    expected = one_forward_kto_loss(module, padded, **options)
    expected_grads = torch.autograd.grad(expected, trained)

    # policy and reference on the mismatched rows without autograd, then on the labelled rows the policy with it
    assert forwards == [(True, False), (True, False), (False, True), (False, False)]
    assert n == 12 and stats["kl"].item() > 0.01, stats["kl"]  # z_0 > 0: the mismatched rows decide the loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_kto_refuses_precomputed_reference_log_probs():
    from lightning_rlhf.modules.dpo import DPOModule

    with pytest.raises(ValueError, match="precompute_ref_logprobs=True: KTO's mismatched rows"):
        DPOModule("never/loaded/sft", loss_type="kto", precompute_ref_logprobs=True)
    with pytest.raises(ValueError, match="undesirable_weight=0.0: must be > 0"):
        DPOModule("never/loaded/sft", loss_type="kto", undesirable_weight=0.0)


def lowercase_preference(module, tmp_path) -> float:
    """Share of held-out planted prompts where the policy gives the lowercase answer a higher log-prob than both of
    the others (test_dpo's planted comparisons, read as pairs)."""
    from lightning_rlhf.models.shared_forward import response_logprobs
    from tests.test_dpo import planted_datamodule

    (tmp_path / "pairs").mkdir(exist_ok=True)
    data = planted_datamodule(tmp_path / "pairs", n_train=96, n_val=32)
    data.setup("fit")
    wins = []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logps, _ = response_logprobs(module.model, batch)
            logps = logps[batch["response_index"]]  # (b, 3): UPPER, lowercase, Title
            wins.append(logps[:, 1] > logps[:, [0, 2]].max(dim=1).values)
    return torch.cat(wins).float().mean().item()


def test_kto_learns_a_planted_preference_from_unpaired_labels(sft_export, tmp_path):
    """KTO on unpaired labels only (each lowercase answer desirable, each UPPER / Title one undesirable, never
    compared): the validation loss falls, the desirable completions' implicit reward rises above the undesirable
    ones', and the policy comes to rank the lowercase answer first on held-out prompts."""
    import lightning as L

    from lightning_rlhf.modules.dpo import DPOModule
    from tests.test_dpo import adamw, learning_run

    L.seed_everything(0)
    module = DPOModule(sft_export, loss_type="kto", beta=0.5, optimizer=adamw(3e-3))
    datamodule = planted_unpaired(tmp_path, n_train=96, n_val=32)
    before, after, prefers_before, prefers_after = learning_run(
        module, datamodule, tmp_path, lambda m: lowercase_preference(m, tmp_path)
    )
    # measured: val/loss 0.500 -> 0.213, val/rewards/margins 0 -> 5.73, lowercase ranked first 0.375 -> 1.0
    assert after["val/loss"] < 0.8 * before["val/loss"], (before, after)
    assert after["val/rewards/margins"] > 0.5, after
    assert prefers_after >= 0.9 > prefers_before, (prefers_before, prefers_after)


def test_mean_token_nll_by_hand():
    """Summed log-probs -4, -6, -3 over 2, 3, 1 tokens are -2, -2, -3 a token; rows 0 and 2 marked: (2 + 3) / 2 =
    2.5; none marked: 0. Catches a sum over rows (5), the token counts ignored ((4 + 3) / 2), a mean over all rows."""
    from lightning_rlhf.modules.dpo import mean_token_nll

    logps, counts = torch.tensor([-4.0, -6.0, -3.0]), torch.tensor([2, 3, 1])
    torch.testing.assert_close(mean_token_nll(logps, counts, torch.tensor([True, False, True])), torch.tensor(2.5))
    torch.testing.assert_close(mean_token_nll(logps, counts, torch.zeros(3, dtype=torch.bool)), torch.tensor(0.0))


@pytest.mark.slow
def test_kto_config_trains_on_the_toy_comparisons_through_the_cli(sft_export, tmp_path):
    """configs/kto.yaml, 4 steps on the toy's shipped comparisons (read as KTO records): every KTO metric logged for
    train and validation, and the exported policy moved from the SFT model."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import fit_config

    events = fit_config(
        "kto.yaml",
        tmp_path,
        f"--model.init_args.model_name_or_path={sft_export}",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2",
    )
    tags = events.Tags()["scalars"]
    for stage in ("train", "val"):
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "nll"):
            assert f"{stage}/{name}" in tags, tags
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    start = AutoModelForCausalLM.from_pretrained(sft_export)
    assert not torch.equal(exported.lm_head.weight, start.lm_head.weight)
