"""Shared fixtures (helpers for building tiny models live in ``tests/helpers.py``)."""

import pytest

from tests.helpers import make_tiny_export


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Path of a tiny causal LM export (read-only for tests: copy it before changing it)."""
    return make_tiny_export(tmp_path_factory.mktemp("tiny") / "model")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
