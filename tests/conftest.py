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


@pytest.fixture
def task_scores():
    """``task_scores(task_name, recipes)`` → ``{recipe: metrics}`` on the task's small subset,
    each recipe prepared and calibrated on the task's calibration batches."""
    def score(name, recipes):
        import fewbits
        from fewbits.tasks import load_task

        task = load_task(name, small=True)
        out = {}
        for recipe in recipes:
            q = fewbits.prepare(task.model, recipe)
            fewbits.calibrate(q, task.calibration)
            out[recipe] = task.evaluate(q)
        return out

    return score
