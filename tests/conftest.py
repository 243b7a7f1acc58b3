"""Test configuration: GPU tests are skipped when CUDA is absent (decided here, never at import)."""
import os

import pytest


def pytest_configure(config):
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors, interpreted
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "fuzz_long: the long fuzz variants (DIFFRT_FUZZ_LONG=1; see README, Tests)")
    # diffusers' schedulers call numpy on torch tensors in ways numpy 2 deprecates: not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:__array:DeprecationWarning")


def pytest_collection_modifyitems(config, items):
    import torch

    long_fuzz = os.environ.get("DIFFRT_FUZZ_LONG") == "1"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_long = pytest.mark.skip(reason="a long fuzz variant: DIFFRT_FUZZ_LONG=1 runs it")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "fuzz_long" in item.keywords and not long_fuzz:
            item.add_marker(skip_long)
