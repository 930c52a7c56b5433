import os

# Triton kernels (baselines.channel_norm, serpent/kernels.py, serpent/linear_kernels.py) are
# tested on the CPU through Triton's interpreter, which must be chosen before triton is first
# imported (triton.language's own jit helpers are interpreted only when defined in interpreter
# mode); the models use them on CPU tensors only where a test asks for them
# (baselines.channel_norm.INTERPRET_ON_CPU, scan_backend="triton").
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# One intra-op thread: on a shared 2-core machine, OpenMP's spinning threads made small ops up to
# 50x slower whenever another process held a core; one thread keeps the suite's time stable.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
