"""Staged execution (fewbits.algorithms.stages): the same measurements as running the whole model
for every layer, with the caller's changes between layers seen downstream, at a cost linear in
depth."""
import torch
from torch import nn

from fewbits.algorithms.hooks import Stop, run_batches
from fewbits.algorithms.stages import measure_in_order


class Block(nn.Module):
    """Not a Sequential: a residual block whose forward the stage runner cannot split."""

    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


class Net(nn.Module):
    def __init__(self, twice=False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.features = nn.Sequential(Block(4), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1), Block(4)), Block(4))
        self.head = nn.Linear(4, 5)
        self.twice = twice

    def forward(self, x):
        x = self.features(self.stem(x))
        if self.twice:  # the stack called twice per forward: its inputs cannot be kept
            x = self.features(x)
        return self.head(x.mean((2, 3)))


def _layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _mean_of(layer, _name):
    got = []

    def hook(module, _args, out):
        got.append(out.double().movedim(1 if out.dim() == 4 else -1, -1).reshape(-1, out.shape[1]).sum(0))
        raise Stop

    return hook, lambda: torch.stack(got).sum(0)


def _naive(model, names, batches, change):
    """The whole model from its input for every layer (what the stages replace)."""
    out = {}
    for name in names:
        hook, read = _mean_of(None, name)
        run_batches(model, batches, [model.get_submodule(name).register_forward_hook(hook)])
        out[name] = read()
        change(model.get_submodule(name), out[name])
    return out


def _change(layer, mean):  # what bias correction does: the next layers must see it
    layer.bias.sub_(mean.float() / 1000)


@torch.no_grad()
def _run(twice):
    torch.manual_seed(0)
    batches = [((torch.randn(2, 3, 6, 6),), {}) for _ in range(3)]
    a, b = Net(twice), Net(twice)
    b.load_state_dict(a.state_dict())
    names = _layers(a)
    calls = {"staged": 0, "naive": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1
        return hook

    a.stem.register_forward_hook(counter("staged"))
    b.stem.register_forward_hook(counter("naive"))
    staged = {}
    for name, value in measure_in_order(a, names, batches, _mean_of):
        staged[name] = value
        _change(a.get_submodule(name), value)
    naive = _naive(b, names, batches, _change)
    return names, staged, naive, calls


def test_stages_measure_what_the_whole_model_measures_with_earlier_changes_seen():
    names, staged, naive, calls = _run(twice=False)
    assert list(staged) == names
    for name in names:  # the same float operations on the same inputs: equal to the bit
        assert torch.equal(staged[name], naive[name]), name
    # the stem runs once per layer before the stack (1), once to keep the stack's inputs, once to
    # check the stack is called once, and for the head (outside the stack): 4 passes, not one per
    # layer (9)
    batches = 3
    assert calls["naive"] == len(names) * batches
    assert calls["staged"] <= 4 * batches


def test_a_stack_called_twice_per_forward_is_run_whole():
    names, staged, naive, calls = _run(twice=True)
    for name in names:
        assert torch.equal(staged[name], naive[name]), name


def _hf_case(kind, cache=False):
    from fewbits.hf import HFOutput
    from fewbits.tasks.models.zoo import ZOO

    case = ZOO[kind]()  # zoo's wrapper keeps HF's default key/value cache; HFOutput turns it off
    return (case.model if cache else HFOutput(case.model.model)), [((), b) for b in case.batches(2, 0)]


def _scale_down(layer, _mean):  # a change the later layers must see (these linears may have no bias)
    layer.weight.mul_(0.999)


@torch.no_grad()
def _hf_run(kind, cache=False):
    import copy

    model, batches = _hf_case(kind, cache)
    twin = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    embed = {"staged": 0, "naive": 0}
    first = {"staged": model, "naive": twin}
    for key, m in first.items():
        emb = next(x for x in m.modules() if isinstance(x, nn.Embedding))
        emb.register_forward_hook(lambda *_, key=key: embed.__setitem__(key, embed[key] + 1))
    staged = {}
    for name, value in measure_in_order(model, names, batches, _mean_of):
        staged[name] = value
        _scale_down(model.get_submodule(name), value)
    return names, staged, _naive(twin, names, batches, _scale_down), embed, len(batches)


import pytest  # noqa: E402


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_decoders_layer_list_runs_one_layer_at_a_time(kind):
    """A Hugging Face decoder's ModuleList of layers (rotary embeddings and the mask passed as
    keywords to each) is a chain: the same values as the whole model for every layer, with the
    embedding run a fixed number of times instead of once per layer."""
    names, staged, naive, embed, batches = _hf_run(kind)
    assert list(staged) == names
    for name in names:  # the same float operations on the same inputs: equal to the bit
        assert torch.equal(staged[name], naive[name]), name
    assert embed["naive"] == len(names) * batches
    # the chain check, the first layer's inputs and the LM head (outside the list): 1 + 1 + 1
    # passes of every batch, not one per layer
    assert embed["staged"] <= 3 * batches


def test_a_layer_list_sharing_a_key_value_cache_runs_whole():
    """With HF's cache on, every layer appends to one shared cache object: running a layer again
    on kept inputs would attend to its keys twice, so the list is not a chain and every layer is
    measured from the model's input (the same values, the quadratic cost)."""
    names, staged, naive, embed, batches = _hf_run("llama", cache=True)
    for name in names:
        assert torch.equal(staged[name], naive[name]), name
    assert embed["staged"] == embed["naive"] + 1  # one more pass of the first batch: the chain check
