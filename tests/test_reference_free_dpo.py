"""SimPO and ORPO in DPOModule: no reference model is built, loaded or counted in the memory estimate, and each
learns a planted preference (its loss is the one of ``losses.dpo_loss``, pinned by hand in test_dpo_loss.py)."""

import lightning as L
import pytest

from lightning_rlhf.modules.dpo import DPOModule
from lightning_rlhf.training import memory
from tests import test_dpo
from tests.test_dpo import adamw, learning_run, planted_datamodule, policy_preference

sft_export = test_dpo.sft_export  # the fixture: a tiny SFT export


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_build_and_estimate_no_reference(sft_export, tmp_path, monkeypatch, loss_type):
    """The memory estimate counts the models handed to ``check_memory``: sigmoid hands the policy and a reference
    of the same size, the reference-free types the policy alone, so half the parameters. Catches: a reference
    loaded anyway, or one left out of the estimate while loaded."""
    seen = {}

    def recording(module, models, generation=None):
        seen[module.hparams.loss_type] = {role: model for role, model in models.items() if model is not None}

    monkeypatch.setattr("lightning_rlhf.modules.dpo.check_memory", recording)
    free, live = DPOModule(sft_export, loss_type=loss_type), DPOModule(sft_export)
    for module in (free, live):
        module.configure_model()
    assert free.ref_model is None and live.ref_model is not None
    assert set(seen[loss_type]) == {"policy"} and set(seen["sigmoid"]) == {"policy", "reference"}
    counted = {name: [memory.count_model(role, m) for role, m in models.items()] for name, models in seen.items()}
    params = {name: sum(c.parameters for c in counts) for name, counts in counted.items()}
    assert params["sigmoid"] == 2 * params[loss_type] == 2 * sum(p.numel() for p in free.model.parameters())


def test_reference_free_losses_refuse_precomputed_reference_log_probs():
    with pytest.raises(
        ValueError, match="precompute_ref_logprobs=True: loss_type=.simpo. uses no reference; leave it unset"
    ):
        DPOModule("never/loaded/sft", loss_type="simpo", precompute_ref_logprobs=True)
    with pytest.raises(ValueError, match="simpo_gamma=-1.0: must be >= 0"):
        DPOModule("never/loaded/sft", loss_type="simpo", simpo_gamma=-1.0)


@pytest.mark.parametrize(("loss_type", "beta"), [("simpo", 2.0), ("orpo", 0.1)])
def test_reference_free_losses_learn_a_planted_preference(sft_export, tmp_path, loss_type, beta):
    """Lowercase answers preferred to UPPER / Title case (test_dpo's planted data): on held-out pairs the validation
    loss falls and the policy comes to prefer the lowercase answer."""
    L.seed_everything(0)
    module = DPOModule(sft_export, loss_type=loss_type, beta=beta, optimizer=adamw(3e-3))
    datamodule = planted_datamodule(tmp_path, n_train=96, n_val=32, batch_size=8)
    before, after, prefers_before, prefers_after = learning_run(
        module, datamodule, tmp_path, lambda m: policy_preference(m, datamodule)
    )
    # measured: simpo val/loss 0.950 -> 0.072, orpo 5.62 -> 3.29; the policy prefers the lowercase 0.55 -> 1.0 (both)
    assert after["val/loss"] < 0.8 * before["val/loss"], (before, after)
    assert prefers_after >= 0.9 > prefers_before, (prefers_before, prefers_after)
