"""Loading from a local Hugging Face directory, padding-independent log-probs, atomic export."""

import os
import shutil

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from lightning_rlhf import DemonstrationDataModule, SFTModule, io
from lightning_rlhf.data.tokenizer import load_tokenizer
from lightning_rlhf.io import EXPORT_MARKER, ExportError, check_export_target
from lightning_rlhf.models.causal_lm import forward_logits, load_causal_lm, sequence_logprobs
from lightning_rlhf.models.export import export_pretrained
from tests.helpers import TINY_CONFIG, make_tiny_gpt2_export


def test_local_directory_loads_the_saved_weights_and_tokenizer(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    saved = load_file(f"{tiny_model_dir}/model.safetensors")
    state = model.state_dict()
    assert set(saved) <= set(state)
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert model.training and model.config.num_hidden_layers == 2
    assert tokenizer("héllo")["input_ids"] == load_tokenizer(None)("héllo")["input_ids"]
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_model_config_overrides_are_refused_for_pretrained_models(tiny_model_dir):
    with pytest.raises(ValueError, match="only applies to the embedded default"):
        load_causal_lm(tiny_model_dir, load_tokenizer(tiny_model_dir), model_config={"hidden_size": 8})


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_left_and_right_padding_give_the_same_sequence_logprobs(tiny_model_dir, tmp_path, architecture):
    """The same 5-token sequence, padded by 3 on either side, scores the same: positions come from the mask.
    Llama's rotary positions only see differences of positions, so only GPT-2's learned absolute positions make
    this fail when ``forward_logits`` leaves ``position_ids`` out."""
    path = tiny_model_dir if architecture == "llama" else make_tiny_gpt2_export(tmp_path / "gpt2")
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer).eval()
    seq, pad = [5, 6, 7, 8, 9], tokenizer.pad_token_id
    input_ids = torch.tensor([seq + [pad] * 3, [pad] * 3 + seq])
    attention_mask = torch.tensor([[1] * 5 + [0] * 3, [0] * 3 + [1] * 5])
    labels = torch.tensor([[-100, -100, 7, 8, 9] + [-100] * 3, [-100] * 3 + [-100, -100, 7, 8, 9]])
    with torch.no_grad():
        logps, counts = sequence_logprobs(model, input_ids, attention_mask, labels)
        unpadded = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)
    brute_force = sum(unpadded[t - 1, seq[t]] for t in (2, 3, 4))
    assert counts.tolist() == [3, 3]
    torch.testing.assert_close(logps.double(), torch.stack([brute_force, brute_force]), atol=1e-5, rtol=0)
    assert forward_logits(model, input_ids, attention_mask).shape == (2, 8, len(tokenizer))


def test_export_replaces_atomically_and_keeps_the_old_one_on_failure(tmp_path, tiny_model_dir, monkeypatch):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    target = tmp_path / "export"
    export_pretrained(model, tokenizer, target)
    before = (target / "model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    monkeypatch.setattr(tokenizer, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_pretrained(model, tokenizer, target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging directory left behind


def test_shifted_logprobs_equal_the_logit_slicing_path_without_copying_the_logits():
    """Shifting the labels instead of slicing ``logits[:, :-1]`` gives the same log-probs and gradient, and autograd
    saves the logits themselves, not a (b, t-1, v) copy of them."""
    from lightning_rlhf.losses.tokens import IGNORE_INDEX, token_logprobs
    from lightning_rlhf.models.causal_lm import shifted_logprobs

    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    old = token_logprobs(logits[:, :-1], labels[:, 1:])
    (old_grad,) = torch.autograd.grad(old.sum(), logits)

    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        new, mask = shifted_logprobs(logits, labels)
    torch.testing.assert_close(new, old, atol=1e-6, rtol=0)
    assert torch.equal(mask, labels[:, 1:] != IGNORE_INDEX)
    (new_grad,) = torch.autograd.grad(new.sum(), logits)
    torch.testing.assert_close(new_grad, old_grad, atol=1e-6, rtol=0)
    big = [t for t in saved if t.numel() >= logits[:, :-1].numel()]
    assert big and all(t.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr() for t in big)


def test_export_refuses_a_non_empty_directory_it_did_not_write(tmp_path, tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    (tmp_path / "scratch" / "precious").mkdir(parents=True)
    (tmp_path / "scratch" / "precious" / "notes.txt").write_text("x")
    with pytest.raises(ExportError, match="no export of ours wrote"):
        export_pretrained(model, tokenizer, tmp_path / "scratch")
    assert (tmp_path / "scratch" / "precious" / "notes.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scratch"]


def test_export_refuses_the_working_directory_even_when_empty(tmp_path, tiny_model_dir, monkeypatch):
    tokenizer = load_tokenizer(tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ExportError, match="would replace"):
        export_pretrained(load_causal_lm(tiny_model_dir, tokenizer), tokenizer, ".")
    with pytest.raises(ExportError, match="would replace"):
        check_export_target(tmp_path / "run", run_dirs=[tmp_path / "run" / "tensorboard"])


def test_export_replaces_an_earlier_export_of_ours_and_fsyncs(tmp_path, tiny_model_dir, monkeypatch):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    export_pretrained(model, tokenizer, tmp_path / "hf")
    assert (tmp_path / "hf" / EXPORT_MARKER).exists()
    (tmp_path / "hf" / "stale.txt").write_text("from the old export")
    synced = []
    real_fsync = io.os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    export_pretrained(model, tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf" / "stale.txt").exists()
    assert any(path.endswith("model.safetensors") for path in synced)
    assert str(tmp_path) in synced  # the directory holding the renamed export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_kill_between_the_two_renames_is_recovered_on_the_next_run(tmp_path, tiny_model_dir):
    """The state a kill leaves between ``target → .hf.old-PID`` and ``staging → target``: no ``hf``, the previous
    export aside and a complete staging directory. The next check puts the previous export back and removes the
    staging directory; a directory of the user's that merely looks like ours (no marker) is left alone."""
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir, tokenizer)
    export_pretrained(model, tokenizer, tmp_path / "hf")
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "hf").rename(tmp_path / ".hf.old-123")
    shutil.copytree(tmp_path / ".hf.old-123", tmp_path / ".hf.tmp-abc")
    (tmp_path / ".hf.tmp-users").mkdir()
    (tmp_path / ".hf.tmp-users" / "notes.txt").write_text("x")
    check_export_target(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.tmp-users", "hf"]


def test_an_unwritable_export_dir_fails_before_training(tmp_path):
    """Root ignores permission bits, so "unwritable" here is a path under a regular file."""
    (tmp_path / "file").write_text("x")
    module = SFTModule(model_config=TINY_CONFIG, export_dir=str(tmp_path / "file" / "hf"))
    steps = []
    module.training_step = lambda batch, batch_idx: steps.append(batch_idx)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ExportError, match="cannot be written"):
        trainer.fit(module, DemonstrationDataModule(batch_size=4, max_length=32))
    assert steps == []
