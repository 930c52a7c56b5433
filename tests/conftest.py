import os

import pytest
import torch

# Without a GPU, Triton kernels (serpent/kernels.py) run on CPU tensors through Triton's
# interpreter. It must be chosen before triton is first imported: triton.language's own jit
# helpers are interpreted only when defined in interpreter mode. Nothing else runs Triton here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
