"""SFTModule: the loss scores exactly the response tokens, it learns, and it resumes where it stopped."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_rlhf import DemonstrationDataModule, SFTModule
from lightning_rlhf.data.collate import DemonstrationCollator
from lightning_rlhf.data.records import Record
from lightning_rlhf.data.tokenization import Tokenizer
from lightning_rlhf.data.tokenizer import load_tokenizer
from tests.helpers import TINY_CONFIG, straight_and_resumed


def tiny_sft(**kwargs) -> SFTModule:
    module = SFTModule(model_config=TINY_CONFIG, **kwargs)
    module.configure_model()
    return module


def make_batch(pairs, max_length=64):
    tokenizer = Tokenizer(load_tokenizer(None), max_length)
    examples = tokenizer.demonstrations(
        [Record(f"test {i}", {"prompt": p, "response": r}) for i, (p, r) in enumerate(pairs)]
    )
    return DemonstrationCollator(tokenizer.tokenizer.pad_token_id)(examples)


def test_sft_loss_scores_each_response_token_from_its_prefix():
    """Brute force, token by token: run the model on input[:t] and read log p(input[t]) from the last position,
    for every response position t (response tokens + EOS); the loss is minus their mean over the batch.
    An off-by-one shift, a scored prompt token or a scored pad token would all change the number."""
    torch.manual_seed(0)
    module = tiny_sft().eval()
    batch = make_batch([("Reverse: abc\n", "cba"), ("Reverse: hello\n", "olleh")])
    with torch.no_grad():
        loss, n_scored = module._loss(batch)
        terms = []
        for row, labels in zip(batch["input_ids"], batch["labels"], strict=True):
            for t in (labels != -100).nonzero().flatten().tolist():
                logits = module.model(row[None, :t]).logits[0, -1].double()
                terms.append(torch.log_softmax(logits, -1)[row[t]])
    assert n_scored == len(terms) == (3 + 1) + (5 + 1)
    torch.testing.assert_close(loss.double(), -torch.stack(terms).mean(), atol=1e-5, rtol=0)


def test_loss_on_all_scores_every_real_token_but_the_first():
    module = tiny_sft(loss_on="all")
    batch = make_batch([("Reverse: abc\n", "cba"), ("Reverse: hello\n", "olleh")])
    _, n_scored = module._loss(batch)
    assert n_scored == batch["attention_mask"].sum() - 2


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


def toy_datamodule(tmp_path, n=8, batch_size=4):
    rows = [
        {"prompt": f"Reverse: {w}\n", "response": w[::-1]}
        for w in ["abc", "hello", "xyz", "lightning", "rlhf", "qwerty", "moon", "sun"][:n]
    ]
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DemonstrationDataModule(train_path=str(path), val_fraction=0, batch_size=batch_size, max_length=32)


def trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(default_root_dir=tmp_path, **{**defaults, **kwargs})


def test_sft_overfits_a_handful_of_demonstrations(tmp_path):
    L.seed_everything(0)
    recorder = LossRecorder()
    module = SFTModule(model_config=TINY_CONFIG, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer(tmp_path, max_steps=80, callbacks=[recorder], enable_checkpointing=False).fit(
        module, toy_datamodule(tmp_path)
    )
    start, end = sum(recorder.losses[:2]) / 2, sum(recorder.losses[-2:]) / 2
    assert start > 4.0  # about ln(259) = 5.6 for an untrained byte model
    assert end < 0.25 * start, (start, end)


def test_resume_from_checkpoint_continues_with_the_same_losses(tmp_path):
    """Two epochs straight vs one epoch, checkpoint, resume for the second: the second epoch's losses agree
    (model, optimiser, scheduler and data order all restored)."""

    def run(max_epochs, ckpt_path=None, root=tmp_path / "run"):
        L.seed_everything(0)
        recorder = LossRecorder()
        module = SFTModule(
            model_config=TINY_CONFIG,
            optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3),
            scheduler=lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.2, total_iters=8),
        )
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
        trainer(root, max_epochs=max_epochs, callbacks=[recorder, checkpoint]).fit(
            module, toy_datamodule(tmp_path), ckpt_path=ckpt_path
        )
        return recorder.losses

    straight = run(2, root=tmp_path / "straight")
    first = run(1, root=tmp_path / "interrupted")
    resumed = run(2, ckpt_path=str(tmp_path / "interrupted" / "last.ckpt"), root=tmp_path / "interrupted")
    assert len(straight) == 4 and first == pytest.approx(straight[:2], abs=1e-6)
    assert resumed == pytest.approx(straight[2:], abs=1e-5)
    assert straight[2] != straight[0]


class NormRecordingSGD(torch.optim.SGD):
    """SGD that records the total gradient norm it is asked to apply (i.e. after any clipping)."""

    norms: list[float] = []

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        NormRecordingSGD.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        super().step()
        return loss


def test_gradient_clip_val_bounds_the_applied_gradient_norm(tmp_path):
    """Clipping goes through SFTModule.configure_gradient_clipping (FSDP-aware); on CPU it must still clip."""
    NormRecordingSGD.norms = []
    module = SFTModule(model_config=TINY_CONFIG, optimizer=lambda p: NormRecordingSGD(p, lr=1e-3))
    trainer(tmp_path, max_steps=3, gradient_clip_val=0.05, enable_checkpointing=False).fit(
        module, toy_datamodule(tmp_path)
    )
    assert len(NormRecordingSGD.norms) == 3
    assert max(NormRecordingSGD.norms) == pytest.approx(0.05, rel=1e-3)


@pytest.mark.gpu
def test_fsdp_bf16_sft_learns_and_exports_full_weights(tmp_path):
    """FSDP (FSDP1, Lightning FSDPStrategy) on one GPU with bf16 mixed precision: the loss falls, norm clipping
    goes through the root module, and the export holds full (unsharded) weights that load back."""
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    L.seed_everything(0)
    recorder = LossRecorder()
    module = SFTModule(
        model_config=TINY_CONFIG, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), export_dir=str(tmp_path / "hf")
    )
    strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="full")
    L.Trainer(
        accelerator="gpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed",
        max_steps=60,
        gradient_clip_val=1.0,
        callbacks=[recorder],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    ).fit(module, toy_datamodule(tmp_path))
    assert sum(recorder.losses[-2:]) < 0.5 * sum(recorder.losses[:2])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert exported.model.embed_tokens.weight.shape == (259, TINY_CONFIG["hidden_size"])


def test_validate_then_fit_reports_the_same_validation_loss_for_the_same_weights(tmp_path):
    """trainer.validate before fit must neither crash a later fit's validation nor leak into it."""
    L.seed_everything(0)
    module = SFTModule(model_config=TINY_CONFIG)
    data = toy_datamodule(tmp_path)
    data.hparams.val_fraction = 0.25
    first = trainer(tmp_path).validate(module, data, verbose=False)[0]["val/loss"]
    second = trainer(tmp_path).validate(module, data, verbose=False)[0]["val/loss"]
    trainer(tmp_path, max_steps=1, enable_checkpointing=False).fit(module, data)
    assert first == pytest.approx(second, abs=1e-6)


class ValidationRecorder(SFTModule):
    """Records each validation batch's loss and scored-token count as plain Python numbers."""

    def validation_step(self, batch, batch_idx):
        loss, n_scored = self._loss(batch)
        self.recorded.append((float(loss), int(n_scored)))
        self.val_loss.update(loss, weight=n_scored)

    def on_validation_epoch_end(self):
        self.counted = self.val_loss.weight.clone()  # before the reset
        super().on_validation_epoch_end()


def test_bf16_true_validation_keeps_metric_states_in_float32(tmp_path):
    """precision="bf16-true" casts the module, torchmetrics states included: the token count and the weighted loss
    sum were kept in bf16 (above 256 a count rounds to 2 or more, and each update's loss was rounded to 8 bits).

    The states must hold exactly what float32 counting gives: weight = Σ n_b over the batches, and val/loss =
    Σ loss_b · n_b / Σ n_b, worked out here in float64 from the per-batch numbers of the same bf16 model."""
    L.seed_everything(0)
    module = ValidationRecorder(model_config=TINY_CONFIG)
    module.recorded = []
    rows = [
        {"prompt": f"Reverse: {w}\n", "response": w[::-1] * 5}
        for w in ["abcdefgh", "hello", "xyzuvw", "lightning", "reinforce", "qwerty", "moonlight", "sunset"]
    ]
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DemonstrationDataModule(train_path=str(path), val_path=str(path), batch_size=1, max_length=96)
    logged = trainer(tmp_path, precision="bf16-true").validate(module, data, verbose=False)[0]
    counts = [n for _, n in module.recorded]
    assert sum(counts) > 256 and len(counts) == 8
    assert module.counted.dtype == torch.float32 and module.counted.item() == sum(counts)
    expected = sum(loss * n for loss, n in module.recorded) / sum(counts)
    assert logged["val/loss"] == pytest.approx(expected, rel=1e-6)


def test_rope_frequencies_stay_float32_when_a_bf16_true_run_casts_the_model(tmp_path):
    """bf16-true casts every buffer; RoPE's inverse frequencies rounded to bf16 are off by up to 4e-3 relative (0.45
    rad of rotation at position 1,024). They are put back, exactly, before the forward."""
    L.seed_everything(0)
    module = SFTModule(model_config=TINY_CONFIG)
    module.configure_model()
    rotary = module.model.model.rotary_emb
    exact = rotary.inv_freq.clone()
    assert not torch.equal(exact.bfloat16().float(), exact)  # the rounding this guards against
    data = toy_datamodule(tmp_path)
    data.hparams.val_fraction = 0.25
    trainer(tmp_path, precision="bf16-true").validate(module, data, verbose=False)
    assert module.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, exact)
    assert torch.equal(rotary.original_inv_freq, exact)


def test_a_resume_mid_epoch_trains_on_the_batches_the_uninterrupted_run_trained_on(tmp_path):
    """4 batches an epoch, checkpoint after step 3 (mid-epoch), 7 steps in all: the resumed run trains on batches
    4..7 of the straight run (the rest of epoch 0, then epoch 1), not on the start of epoch 0 again, with the same
    losses."""

    def fit(callbacks, ckpt_path):
        L.seed_everything(0)
        module = SFTModule(model_config=TINY_CONFIG, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3))
        trainer(tmp_path, max_steps=7, callbacks=callbacks).fit(
            module, toy_datamodule(tmp_path, 8, 2), ckpt_path=ckpt_path
        )

    straight, resumed = straight_and_resumed(fit, ("train/loss",), 3, tmp_path)
    assert len(straight.batches) == 7 and straight.batches[4] != straight.batches[0]
    assert resumed.batches == straight.batches[3:]
    torch.testing.assert_close(resumed.metrics, straight.metrics[3:], atol=1e-5, rtol=0)
