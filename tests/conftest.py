import os

import pytest
import torch
from hypothesis import settings

# Two cores: oversubscribed threads make torch crawl, and one thread keeps reductions deterministic.
torch.set_num_threads(1)
settings.register_profile("fewbits", deadline=None, max_examples=int(os.environ.get("FEWBITS_HYPOTHESIS_EXAMPLES", 60)))
settings.load_profile("fewbits")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
