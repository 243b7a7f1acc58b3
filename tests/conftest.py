"""Test configuration: GPU tests are skipped when CUDA is absent (decided here, never at import)."""
import os

import pytest


def pytest_configure(config):
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors, interpreted
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    # diffusers' schedulers call numpy on torch tensors in ways numpy 2 deprecates: not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:__array:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
