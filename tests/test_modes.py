"""``models.modes.evaluating``: eval mode for a block, each model's own mode given back after it."""

import pytest
import torch
from torch import nn

from lightning_rlhf.models.modes import evaluating


def dropout_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))


def test_evaluating_puts_every_model_in_eval_and_gives_each_its_own_mode_back():
    """Two models, one already in eval and one training. Inside the block both are in eval, submodules too, and
    dropout is off (two forwards of the training one agree); after it the eval one is still in eval and the other
    trains again. Catches a restore to ``train()`` for all (the eval model would come out training), a restore of
    the first model's mode to all (the training one would stay in eval), or only the first model put in eval."""
    frozen, training = dropout_model().eval(), dropout_model().train()
    inputs = torch.ones(64, 4)
    with evaluating(frozen, training):
        assert not any(module.training for model in (training, frozen) for module in model.modules())
        torch.testing.assert_close(training(inputs), training(inputs), atol=0, rtol=0)
    assert all(module.training for module in training.modules())
    assert not any(module.training for module in frozen.modules())


def test_evaluating_gives_the_modes_back_when_the_block_raises():
    """An exception inside the block still gives the training model its train mode back (and leaves the eval one
    in eval), and the exception goes on to the caller. Catches a restore that is not in a ``finally`` (the model
    would stay in eval after a failed forward, and train on without dropout) or one that swallows the error."""
    training, frozen = dropout_model().train(), dropout_model().eval()
    with pytest.raises(RuntimeError, match="forward failed"), evaluating(training, frozen):
        raise RuntimeError("forward failed")
    assert training.training and training[1].training
    assert not frozen.training and not frozen[1].training
