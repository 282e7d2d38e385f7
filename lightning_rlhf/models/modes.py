"""Train / eval mode of models, set for a block and given back after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Every model in eval mode inside the block (no dropout), each given back the mode it had before, also when
    the block raises. The mode goes back through ``model.train(mode)``, which sets it on all of a model's submodules.
    """
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, training in zip(models, modes, strict=True):
            model.train(training)
