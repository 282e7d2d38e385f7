"""Shared fixtures (helpers for building tiny models live in ``tests/helpers.py``)."""

import os
import shutil
import tempfile

# DataModules cache tokenized data in the datasets cache by default: point it (for subprocesses too) at a directory
# of this run, set before anything imports datasets, which reads it once.
DATASETS_CACHE = tempfile.mkdtemp(prefix="lightning_rlhf-tests-datasets-")
os.environ["HF_DATASETS_CACHE"] = DATASETS_CACHE

import pytest  # noqa: E402

from tests.helpers import make_tiny_export  # noqa: E402


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(DATASETS_CACHE, ignore_errors=True)


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
