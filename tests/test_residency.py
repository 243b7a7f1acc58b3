"""The residency emulation (diffrt.runtime.residency) on toys: each kind of blocking read counts exactly one
sync, each host-to-device copy one copy, device arithmetic and non-blocking copies into pinned memory none,
results are those of the plain run; LaggedRead reads late without blocking; on CUDA the real counter agrees."""
from __future__ import annotations

import pytest
import torch
from diffrt.runtime.residency import (
    EMULATED_DEVICE,
    Counts,
    LaggedRead,
    count_calls,
    count_sampling,
    current_emulation,
    emulated_device,
    is_device_resident,
    sync_counter,
)


def _random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# each entry: what the host would wait for, as a function of a device tensor x [4, 3] and its mask m
BLOCKING_READS = {
    "item": lambda x, m: x[0, 0].item(),
    "int": lambda x, m: int(x[0, 0]),
    "float": lambda x, m: float(x[0, 0]),
    "bool": lambda x, m: bool(x[0, 0] > 0),
    "if tensor": lambda x, m: 1 if (x > 0).any() else 0,
    "nonzero": lambda x, m: m.nonzero(),
    "where with one argument": lambda x, m: torch.where(m),
    "boolean mask index": lambda x, m: x[m],
    "boolean row mask": lambda x, m: x[m[:, 0]],
    "boolean mask assignment": lambda x, m: x.clone().index_put_((m,), torch.zeros((), device=x.device)),
    "masked_select": lambda x, m: x.masked_select(m),
    "unique": lambda x, m: torch.unique(m),
    "repeat_interleave": lambda x, m: torch.repeat_interleave(m.long().sum(1)),
    "one_hot without num_classes": lambda x, m: torch.nn.functional.one_hot(m.long().flatten()),
    "equal": lambda x, m: torch.equal(x, x),
    "tolist": lambda x, m: x.tolist(),
    "numpy": lambda x, m: x.numpy(),
    "cpu": lambda x, m: x.cpu(),
    "to host": lambda x, m: x.to("cpu"),
    "copy into a host tensor": lambda x, m: torch.empty(4, 3).copy_(x),
    "non_blocking copy into pageable memory": lambda x, m: torch.empty(4, 3).copy_(x, non_blocking=True),
    "print": lambda x, m: repr(x),
    "device indices into a host tensor": lambda x, m: torch.linspace(0, 1, 10)[m.sum(1)],
}

NO_SYNC = {
    "arithmetic": lambda x, m: (x * 2 + 1).exp().sum(0),
    "reductions stay on the device": lambda x, m: (x.abs().mean(), m.sum(), m.any()),
    "fixed-shape selection": lambda x, m: torch.where(m, x, 0.0).index_select(0, torch.arange(2, device=x.device)),
    "repeat_interleave with output_size": lambda x, m: torch.repeat_interleave(
        torch.arange(2, device=x.device), torch.ones(2, dtype=torch.long, device=x.device), output_size=2),
    "one_hot with num_classes": lambda x, m: torch.nn.functional.one_hot(m.long().flatten(), 2),
    "factories on the device": lambda x, m: (torch.zeros(3, device=x.device), torch.randn(2, device=x.device),
                                             torch.arange(5, device=x.device), torch.full((2,), 3.0, device=x.device)),
    "likes follow their input": lambda x, m: (torch.zeros_like(x), x.new_ones(2), torch.randn_like(x)),
    "a 0-dim host tensor is a kernel scalar": lambda x, m: x * torch.tensor(2.0),
    "host work stays on the host": lambda x, m: torch.tensor([1.0, 2.0]).sum().item() + torch.rand(()).item(),
    "to the device it is on": lambda x, m: x.to(x.device).to(torch.float64),
}


@pytest.mark.parametrize("name", sorted(BLOCKING_READS))
def test_each_blocking_read_counts_one_sync(name):
    with emulated_device() as dev:
        x = dev.to_device(_random(4, 3))
        m = x > 0
        BLOCKING_READS[name](x, m)
        counts = dev.counts()
    assert counts == Counts(syncs=1), [str(e) for e in dev.events]
    assert dev.events[0].where.endswith(")") and "test_residency.py" in dev.events[0].where


@pytest.mark.parametrize("name", sorted(NO_SYNC))
def test_device_work_counts_nothing(name):
    with emulated_device() as dev:
        x = dev.to_device(_random(4, 3))
        NO_SYNC[name](x, x > 0)
    assert dev.counts() == Counts(), [str(e) for e in dev.events]


def test_results_equal_the_plain_run_and_residency_follows_the_data():
    x, w = _random(4, 3), _random(3, 3, seed=1)
    plain = torch.nn.functional.linear(x, w).softmax(-1)[x[:, 0] > 0]
    with emulated_device() as dev:
        dx, dw = dev.to_device(x), dev.to_device(w)
        emulated = torch.nn.functional.linear(dx, dw).softmax(-1)[dx[:, 0] > 0]
        assert dev.is_device(emulated) and emulated.device == EMULATED_DEVICE
        assert not dev.is_device(torch.ones(2)) and torch.ones(2).device == torch.device("cpu")
        host = emulated.cpu()
        assert not dev.is_device(host) and dev.is_device(emulated)  # the read made a host copy
    assert torch.equal(emulated, plain) and torch.equal(host, plain)
    assert emulated.device == torch.device("cpu")  # outside the block, a plain CPU tensor again


@pytest.mark.parametrize("make", [
    lambda d: torch.tensor([1.0, 2.0, 3.0], device=d),
    lambda d: torch.as_tensor([1.0, 2.0, 3.0], device=d),
    lambda d: torch.as_tensor(3, device=d),
    lambda d: torch.tensor([1.0, 2.0, 3.0]).to(d),
    lambda d: torch.tensor([1.0, 2.0, 3.0]).to(device=d, dtype=torch.float64),
    lambda d: torch.randn(3, generator=torch.Generator().manual_seed(0)).to(d),
], ids=["tensor(list)", "as_tensor(list)", "as_tensor(int)", "to", "to with dtype", "CPU generator draw"])
def test_python_or_host_data_sent_to_the_device_is_one_copy(make):
    with emulated_device() as dev:
        x = dev.to_device(_random(3))
        y = make(x.device)
        assert dev.is_device(y)
        (x + y).sum()  # used on the device: no further copy
    assert dev.counts() == Counts(h2d=1), [str(e) for e in dev.events]


def test_a_host_tensor_used_with_device_tensors_counts_one_copy():
    host = torch.tensor([1.0, 2.0, 3.0])  # from a Python list: host data
    with emulated_device() as dev:
        x = dev.to_device(_random(3))
        out = x * host
        assert dev.is_device(out)
    assert dev.counts() == Counts(h2d=1)
    torch.testing.assert_close(out, _random(3) * host)


def test_module_weights_live_on_the_device():
    layer = torch.nn.Linear(3, 2)
    with emulated_device() as dev:
        dev.to_device(layer)
        x = dev.to_device(_random(4, 3))
        layer(x)
        moved = torch.nn.Linear(3, 2).to(x.device)  # nn.Module.to: one copy per parameter
        assert dev.is_device(moved.weight) and dev.is_device(moved(x))
    assert dev.counts() == Counts(h2d=2), [str(e) for e in dev.events]


def test_pinned_non_blocking_copies_do_not_block():
    with emulated_device() as dev:
        x = dev.to_device(_random(4, 3))
        staged = torch.empty(4, 3, pin_memory=True)  # emulated pinned memory
        assert staged.is_pinned() and not dev.is_device(staged)
        staged.copy_(x, non_blocking=True)  # device -> pinned host, asynchronous
        back = dev.to_device(torch.zeros(4, 3))
        back.copy_(staged, non_blocking=True)  # pinned host -> device, asynchronous
        torch.zeros(4, 3).pin_memory().to(x.device, non_blocking=True)
        back.copy_(torch.ones(4, 3))  # pageable host -> device: blocking
    assert dev.counts() == Counts(h2d=1, h2d_async=2, d2h_async=1), [str(e) for e in dev.events]
    torch.testing.assert_close(staged, _random(4, 3))


def test_sections_split_the_counts_and_count_calls_averages():
    with emulated_device() as dev:
        x = dev.to_device(_random(4))
        with dev.section("setup"):
            x.sum().item()
        per_call, events = count_calls(dev, lambda i: [x[i].item() for _ in range(i)], calls=3, warmup=1)
    assert dev.counts("setup") == Counts(syncs=1)
    assert per_call == Counts(syncs=(1 + 2 + 3) / 3) and len(events) == 6
    assert dev.counts("warmup") == Counts()  # call 0 reads nothing


def test_count_sampling_splits_setup_start_and_steps():
    class Toy:
        def __init__(self):
            self.steps = 3

        def start(self, noise):
            return noise.clone(), torch.tensor([1.0]).to(noise.device)  # one copy per start

        def step(self, state):
            return state[0].add_(state[1])

        def sample(self, noise):
            noise.abs().max().item()  # a check before start: setup
            state = self.start(noise)
            for _ in range(self.steps):
                self.step(state)
                state[0].sum().item()  # one read per step
            return state[0]

    toy = Toy()
    with emulated_device() as dev:
        counts = count_sampling(dev, toy, dev.to_device(_random(2)))
    assert counts.steps == 3 and counts.setup == Counts(syncs=1, h2d=1) and counts.start == Counts(h2d=1)
    assert counts.per_step == Counts(syncs=1.0)
    assert "start" not in vars(toy) and "step" not in vars(toy)  # the wrappers are gone


def test_lagged_read_never_blocks_and_returns_the_newest_copy():
    with emulated_device() as dev:
        value = dev.to_device(torch.tensor([3, 1]))
        reader = LaggedRead(value)
        assert reader.latest() is None and reader.buffer.is_pinned()
        reader.request(value)
        first = reader.latest()
        reader.request(value * 2)
        assert torch.equal(first, torch.tensor([3, 1])) and not dev.is_device(first)
        assert torch.equal(reader.latest(), torch.tensor([6, 2]))
        assert int(first[0]) == 3  # a host value: reading it waits for nothing
        with pytest.raises(ValueError, match="LaggedRead holds"):
            reader.request(torch.zeros(3, dtype=torch.int64, device=value.device))
    assert dev.counts() == Counts(d2h_async=2), [str(e) for e in dev.events]


class _Event:
    """A CUDA event stand-in: ``done`` says whether the GPU has passed it."""

    def __init__(self):
        self.done = False

    def record(self):
        self.done = False

    def query(self):
        return self.done


def test_lagged_read_finds_the_newest_completed_copy_while_the_gpu_runs_behind():
    reader = LaggedRead(torch.zeros((), dtype=torch.int64))
    reader.buffers = [torch.zeros((), dtype=torch.int64) for _ in range(3)]  # three copies in flight at most
    reader.events = [_Event() for _ in range(3)]
    for value in (1, 2):
        reader.request(torch.tensor(value))
    assert reader.latest() is None  # nothing has arrived: the host does not wait
    reader.events[0].done = True
    assert int(reader.latest()) == 1
    reader.request(torch.tensor(3))
    reader.events[1].done = reader.events[2].done = True
    assert int(reader.latest()) == 3  # the newest of those that arrived
    for value in (4, 5, 6, 7):  # four more with none arriving: the oldest buffer is reused
        reader.request(torch.tensor(value))
    assert int(reader.latest()) == 3
    for event in reader.events:
        event.done = True
    assert int(reader.latest()) == 7


def test_lagged_read_on_plain_cpu():
    reader = LaggedRead(torch.zeros(2))
    reader.request(torch.tensor([1.5, -2.0]))
    assert torch.equal(reader.latest(), torch.tensor([1.5, -2.0]))


def test_device_residency_is_what_the_host_would_wait_for():
    host = torch.zeros(2)
    with emulated_device() as dev:
        on_device = dev.to_device(host)
        assert is_device_resident(on_device) and not is_device_resident(host)
    assert not is_device_resident(on_device)  # outside the block: a CPU tensor


def test_the_emulation_is_scoped_to_its_block():
    assert current_emulation() is None
    with emulated_device() as dev:
        assert current_emulation() is dev
        with pytest.raises(RuntimeError, match="do not nest"), emulated_device():
            pass
        with pytest.raises(TypeError, match="tensor or an nn.Module"):
            dev.to_device([1.0])
    assert current_emulation() is None
    with sync_counter("cpu") as counter:
        assert counter.device == EMULATED_DEVICE


# ---------------------------------------------------------------------------------------------- on CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("name", ["item", "nonzero", "boolean mask index", "tolist", "cpu", "copy into a host tensor"])
def test_cuda_counter_counts_the_real_syncs(name):
    with sync_counter("cuda") as counter:
        x = counter.to_device(_random(4, 3))
        torch.cuda.synchronize()
        before = counter.counts()
        BLOCKING_READS[name](x, x > 0)
        after = counter.counts()
    assert after.syncs - before.syncs >= 1 and after.h2d == before.h2d


@pytest.mark.gpu
def test_cuda_counter_tells_copies_from_syncs():
    with sync_counter("cuda") as counter:
        x = counter.to_device(_random(4, 3))  # the counter's own setup: not counted
        (x * 2 + 1).sum(0)
        torch.ones(4, 3).to("cuda")  # pageable host -> device: blocking
        pinned = counter.pin(torch.zeros(4, 3))
        pinned.to("cuda", non_blocking=True)
        reader = LaggedRead(x)
        reader.request(x)
        torch.cuda.synchronize()  # an explicit sync is counted too
        counts = counter.counts()
    assert counts.h2d == 1 and counts.h2d_async == 1 and counts.syncs == 1, [str(e) for e in counter.events]
    assert torch.equal(reader.latest(), x.cpu())
