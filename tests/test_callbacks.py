"""lightning_rlhf.training.callbacks: the best validation's weights restored before a stage exports."""

import lightning.pytorch as pl
import pytest
import torch

from lightning_rlhf.training.callbacks import BestWeights


class Scripted(pl.LightningModule):
    """A linear layer trained by SGD on a fixed batch; its validations log ``val/metric`` from ``values`` in turn and
    record the weight they saw, and ``on_train_end`` records the weight it would export."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.values = values
        self.seen: list[torch.Tensor] = []
        self.exported: torch.Tensor | None = None

    def training_step(self, batch, batch_idx):
        return self.layer(torch.ones(4, 2)).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.log("val/metric", self.values[len(self.seen)])
            self.seen.append(self.layer.weight.detach().clone())

    def on_train_end(self):
        self.exported = self.layer.weight.detach().clone()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("mode", "best"), [("min", 1), ("max", 2)])
def test_best_weights_are_the_ones_exported(mode, best):
    """Validations after each of 4 steps log 3, 1, 4, 2: with mode min the export must hold the weights of the 2nd
    validation (value 1), with mode max those of the 3rd (value 4); every step changes the weight, so each
    validation's differs from the last. Catches: the last weights exported (no restore, or the restore after the
    module's export), the wrong direction, and the sanity check's validation counted (it would shift the values)."""
    data = torch.utils.data.DataLoader(torch.zeros(1, 1))
    module = Scripted([3.0, 1.0, 4.0, 2.0])
    trainer = pl.Trainer(
        max_steps=4,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[BestWeights("val/metric", mode)],
        num_sanity_val_steps=1,
    )
    trainer.fit(module, data, data)
    assert len(module.seen) == 4 and not torch.equal(module.seen[best], module.seen[-1])
    torch.testing.assert_close(module.exported, module.seen[best], rtol=0, atol=0)


def test_best_weights_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="'min' \\(a loss\\) or 'max'"):
        BestWeights("val/loss", "lowest")


def test_best_weights_refuses_a_monitor_that_validation_never_logs():
    """A misspelt monitor must fail at the first validation, naming the metrics logged, rather than export the last
    weights as if they were the best. Catches a silent skip of a missing metric (the callback's old behaviour)."""
    data = torch.utils.data.DataLoader(torch.zeros(1, 1))
    trainer = pl.Trainer(
        max_steps=2,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[BestWeights("val/metrik", "min")],
        num_sanity_val_steps=1,
    )
    with pytest.raises(RuntimeError, match="no 'val/metrik'.*: val/metric"):
        trainer.fit(Scripted([3.0, 1.0]), data, data)
