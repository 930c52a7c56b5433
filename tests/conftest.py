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
