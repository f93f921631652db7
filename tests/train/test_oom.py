"""Batches that fit in memory: micro-batch splitting (gradients equal the full batch's), the out-of-memory back-off on
a simulated CUDA OOM (same parameters after the step as an un-OOMed run, one log line, exact resume), the
`data.batch_size=auto` search, and the config option."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import vitforge.train.oom as oom_module
from vitforge.config import load_config
from vitforge.errors import ConfigError, VitforgeError
from vitforge.train.oom import (
    CPU_BATCH_SIZE,
    OomBackoff,
    OutOfMemory,
    auto_batch_size,
    find_batch_size,
    is_oom,
    micro_batches,
    preserved,
    split_batch,
    trial_step,
)

BACKOFF_LOG = "out of device memory at a micro-batch"


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def batch(n: int = 64, seed: int = 1, soft: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.softmax(torch.randn(n, 3, generator=g), 1) if soft else torch.randint(0, 3, (n,), generator=g)
    return x, y


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return -(y * F.log_softmax(out, 1)).sum(1).mean() if y.dtype.is_floating_point else F.cross_entropy(out, y)


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def oom() -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                       "of 15.89 GiB of which 1.12 GiB is free.")


# ---- micro-batches ---------------------------------------------------------------------------------------------------
def test_split_batch_chunks_and_shares():
    x, y = batch(10)
    parts = split_batch(x, y, 4)
    assert [p[0].shape[0] for p in parts] == [4, 4, 2] and [p[1].shape[0] for p in parts] == [4, 4, 2]
    assert [p[2] for p in parts] == pytest.approx([0.4, 0.4, 0.2])
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
    assert len(split_batch(x, y, 10)) == 1 and len(split_batch(x, y, 64)) == 1
    with pytest.raises(ValueError, match="micro-batch size must be >= 1, got 0"):
        split_batch(x, y, 0)
    window = [batch(6, seed=1), batch(6, seed=2)]
    mbs = list(micro_batches(window, 4))
    assert [m.x.shape[0] for m in mbs] == [4, 2, 4, 2]
    assert [m.weight for m in mbs] == pytest.approx([4 / 12, 2 / 12, 4 / 12, 2 / 12])
    assert [m.last for m in mbs] == [False, False, False, True]


@pytest.mark.parametrize("soft", [False, True])
def test_micro_batch_gradients_equal_the_full_batch(soft):
    x, y = batch(64, soft=soft)
    ref = tiny_model()
    loss_of(ref, x, y).backward()
    expected = grads(ref)
    for size in (64, 32, 16, 24, 1):  # 1x64, 2x32, 4x16, 24+24+16 (a partial last chunk), 64x1
        model = tiny_model()
        total = 0.0
        for mb in micro_batches([(x, y)], size):
            loss = loss_of(model, mb.x, mb.y)
            (loss * mb.weight).backward()
            total += loss.item() * mb.weight
        assert total == pytest.approx(loss_of(ref, x, y).item(), abs=1e-6)
        for g, e in zip(grads(model), expected, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


def test_micro_batches_of_an_accumulation_window_equal_the_mean_of_the_batches():
    window = [batch(32, seed=1), batch(32, seed=2)]  # train.grad_accum=2: the mean of the two batches' mean losses
    ref = tiny_model()
    for x, y in window:
        (loss_of(ref, x, y) / len(window)).backward()
    model = tiny_model()
    for mb in micro_batches(window, 12):
        (loss_of(model, mb.x, mb.y) * mb.weight).backward()
    for g, e in zip(grads(model), grads(ref), strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)


# ---- the back-off -------------------------------------------------------------------------------------------------
class SimulatedStep:
    """The step's forward/backward passes; raises CUDA OOM once a micro-batch larger than `fits` has been through
    backward (so gradients are dirty when it fails), while `armed`."""

    def __init__(self, model: nn.Module, window, fits: int | None):
        self.model, self.window, self.fits, self.armed = model, window, fits, True
        self.calls: list[int] = []

    def __call__(self, micro: int) -> float:
        self.calls.append(micro)
        total = 0.0
        for mb in micro_batches(self.window, micro):
            loss = loss_of(self.model, mb.x, mb.y)
            (loss * mb.weight).backward()
            if self.armed and self.fits is not None and mb.x.shape[0] > self.fits:
                raise oom()
            total += loss.item() * mb.weight
        return total


def one_step(model, opt, ctrl: OomBackoff, window, fits):
    step = SimulatedStep(model, window, fits)
    loss = ctrl.run(step, reset=lambda: opt.zero_grad(set_to_none=True))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, step


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                                      lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05)],
                         ids=["sgd", "adamw"])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_backoff_after_simulated_oom_gives_the_parameters_of_an_unsplit_step(make_opt, grad_accum, caplog):
    window = [batch(64, seed=s) for s in range(1, grad_accum + 1)]
    ref = tiny_model()
    ref_opt = make_opt(ref.parameters())
    ref_loss, _ = one_step(ref, ref_opt, OomBackoff(64, grad_accum), window, fits=None)

    model = tiny_model()
    opt = make_opt(model.parameters())
    ctrl = OomBackoff(64, grad_accum)
    with caplog.at_level(logging.WARNING, logger="vitforge"):
        loss, step = one_step(model, opt, ctrl, window, fits=20)
    assert step.calls == [64, 32, 16]  # retried from the step's start after each OOM
    assert (ctrl.micro_batch, ctrl.accum, ctrl.backoffs) == (16, 4 * grad_accum, 2)
    assert ctrl.micro_batch * ctrl.accum == 64 * grad_accum  # the effective batch is unchanged
    lines = [r.getMessage() for r in caplog.records if BACKOFF_LOG in r.getMessage()]
    assert lines == [f"out of device memory at a micro-batch of 64: continuing with micro-batches of 16, "
                     f"{4 * grad_accum} per optimizer step (effective batch {64 * grad_accum} unchanged)"]
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)

    # The next step runs at the reached micro-batch directly, and logs nothing.
    caplog.clear()
    _, step2 = one_step(model, opt, ctrl, [batch(64, seed=9)] * grad_accum, fits=20)
    assert step2.calls == [16] and not [r for r in caplog.records if BACKOFF_LOG in r.getMessage()]


def test_backoff_of_an_odd_batch_rounds_up_and_keeps_every_image():
    ctrl = OomBackoff(6, 1)
    model = tiny_model()
    step = SimulatedStep(model, [batch(6)], fits=2)
    ctrl.run(step, reset=lambda: model.zero_grad(set_to_none=True))
    assert step.calls == [6, 3, 2] and (ctrl.micro_batch, ctrl.accum) == (2, 3)


def test_oom_at_micro_batch_one_is_a_one_line_error_and_gradients_are_cleared():
    model = tiny_model()
    ctrl = OomBackoff(4, 1)
    step = SimulatedStep(model, [batch(4)], fits=0)
    with pytest.raises(OutOfMemory) as info:
        ctrl.run(step, reset=lambda: model.zero_grad(set_to_none=True))
    msg = str(info.value)
    assert isinstance(info.value, VitforgeError) and "\n" not in msg
    assert msg.startswith("data.batch_size: out of device memory even at a micro-batch of 1 image (batch 4 x "
                          "train.grad_accum 1)") and "CUDA out of memory. Tried to allocate 2.00 GiB" in msg
    assert step.calls == [4, 2, 1] and all(p.grad is None for p in model.parameters())


def test_other_errors_and_a_disabled_backoff_pass_through():
    def fails(micro):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    ctrl = OomBackoff(8, 1)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        ctrl.run(fails, reset=lambda: None)
    assert ctrl.micro_batch == 8

    def out_of_memory(micro):
        raise oom()

    off = OomBackoff(8, 1, enabled=False)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        off.run(out_of_memory, reset=lambda: None)
    assert off.micro_batch == 8
    assert is_oom(oom()) and is_oom(RuntimeError("CUDA error: out of memory"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 8 GB)"))
    assert not is_oom(RuntimeError("DefaultCPUAllocator: not enough memory")) and not is_oom(ValueError("x"))


def test_backoff_state_round_trip_and_exact_resume(caplog):
    def run(steps, ctrl, model, opt, oom_at):
        for i in steps:
            step = SimulatedStep(model, [batch(32, seed=10 + i)], fits=8)
            step.armed = i == oom_at  # a transient OOM (e.g. fragmentation) at one step only
            ctrl.run(step, reset=lambda: opt.zero_grad(set_to_none=True))
            opt.step()
            opt.zero_grad(set_to_none=True)

    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctrl = OomBackoff(32, 1)
    run(range(4), ctrl, model, opt, oom_at=1)  # uninterrupted
    assert ctrl.micro_batch == 8

    model2 = tiny_model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    ctrl2 = OomBackoff(32, 1)
    run(range(2), ctrl2, model2, opt2, oom_at=1)
    saved = copy.deepcopy({"model": model2.state_dict(), "opt": opt2.state_dict(), "oom": ctrl2.state_dict()})
    assert saved["oom"] == {"micro_batch": 8, "accum": 4, "batch_size": 32}

    model3 = tiny_model(seed=5)
    model3.load_state_dict(saved["model"])
    opt3 = torch.optim.AdamW(model3.parameters(), lr=1e-2)
    opt3.load_state_dict(saved["opt"])
    ctrl3 = OomBackoff(32, 1)
    ctrl3.load_state_dict(saved["oom"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitforge"):
        run(range(2, 4), ctrl3, model3, opt3, oom_at=1)
    assert (ctrl3.micro_batch, ctrl3.accum) == (8, 4) and not caplog.records
    for p, q in zip(model3.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)  # bitwise: the resumed run splits the batches exactly as the uninterrupted one

    accum2 = OomBackoff(32, 2)  # a resume may change train.grad_accum: accum follows
    accum2.load_state_dict(saved["oom"])
    assert (accum2.micro_batch, accum2.accum) == (8, 8)
    with pytest.raises(ValueError, match="its batch_size 32 is not this run's data.batch_size 64"):
        OomBackoff(64, 1).load_state_dict(saved["oom"])
    with pytest.raises(ValueError, match="it is a list, not a mapping"):
        OomBackoff(32, 1).load_state_dict([8])
    for bad in (0, 33, "8", 2.0, True, None):
        with pytest.raises(ValueError, match=r"its micro_batch .* is not a whole number in \[1, 32\]"):
            OomBackoff(32, 1).load_state_dict({**saved["oom"], "micro_batch": bad})


# ---- data.batch_size=auto -------------------------------------------------------------------------------------------
class FakeDevice:
    """try_step that runs out of memory above `capacity` images, recording the batches tried."""

    def __init__(self, capacity: int, error=None):
        self.capacity, self.tried, self.error = capacity, [], error

    def __call__(self, b: int) -> None:
        self.tried.append(b)
        if self.error is not None:
            raise self.error
        if b > self.capacity:
            raise oom()


@pytest.mark.parametrize("capacity", [1, 5, 16, 100, 257, 1000])
def test_find_batch_size_finds_the_largest_fitting_batch(capacity):
    dev = FakeDevice(capacity)
    assert find_batch_size(dev, start=16, limit=4096, headroom=1.0) == capacity
    assert find_batch_size(FakeDevice(capacity), start=16, limit=4096, headroom=0.9) == max(1, int(capacity * 0.9))
    assert capacity in dev.tried and capacity + 1 in dev.tried  # both sides of the boundary were tried
    assert len(dev.tried) <= 2 * 13  # doubling, then bisection: logarithmic


def test_find_batch_size_doubles_then_bisects_and_respects_the_limit():
    dev = FakeDevice(100)
    assert find_batch_size(dev, start=16, limit=4096, headroom=1.0) == 100
    assert dev.tried == [16, 32, 64, 128, 96, 112, 104, 100, 102, 101]
    capped = FakeDevice(10**6)
    assert find_batch_size(capped, start=16, limit=50, headroom=0.9) == 45
    assert capped.tried == [16, 32, 50]
    with pytest.raises(OutOfMemory, match=r"^data.batch_size=auto: not even one image fits in device memory; .*"
                                          r"\(CUDA out of memory. Tried to allocate 2.00 GiB"):
        find_batch_size(FakeDevice(0), start=16, limit=4096)
    with pytest.raises(ValueError, match="not a tensor"):
        find_batch_size(FakeDevice(10, error=ValueError("not a tensor")))


def test_auto_batch_size_skips_the_search_on_cpu(caplog):
    def no_optimizer():
        raise AssertionError("no trial step may run on the CPU")

    said = []
    with caplog.at_level(logging.INFO, logger="vitforge"):
        b = auto_batch_size(tiny_model(), no_optimizer, (8,), 3, torch.device("cpu"), limit=1000, say=said.append)
    assert b == CPU_BATCH_SIZE
    assert said == [f"data.batch_size=auto: no memory search on cpu; using {CPU_BATCH_SIZE}"]
    assert [r.getMessage() for r in caplog.records] == said
    assert auto_batch_size(tiny_model(), no_optimizer, (8,), 3, torch.device("cpu"), limit=20) == 20


def test_auto_batch_size_on_cuda_searches_and_keeps_headroom(monkeypatch, caplog):
    fake = FakeDevice(100)  # a pretend GPU that holds 100 images: the search itself, without CUDA
    monkeypatch.setattr(oom_module, "trial_step", lambda *a, **k: fake)
    cuda = torch.device("cuda")
    with caplog.at_level(logging.INFO, logger="vitforge"):
        assert auto_batch_size(tiny_model(), torch.optim.SGD, (8,), 3, cuda, limit=10_000) == 90
        assert auto_batch_size(tiny_model(), torch.optim.SGD, (8,), 3, cuda, limit=64) == 57
        assert auto_batch_size(tiny_model(), torch.optim.SGD, (8,), 3, cuda, limit=10_000, headroom=0.5) == 50
    assert [r.getMessage() for r in caplog.records] == [
        "data.batch_size=auto: 100 images fit in a trial step on cuda; using 90 (0.9 of it)",
        "data.batch_size=auto: 64 images fit (the limit) in a trial step on cuda; using 57 (0.9 of it)",
        "data.batch_size=auto: 100 images fit in a trial step on cuda; using 50 (0.5 of it)"]
    assert max(fake.tried) <= oom_module.AUTO_LIMIT


def test_trial_steps_run_the_optimizer_and_change_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 3))
    model.eval()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    step = trial_step(model, lambda: torch.optim.AdamW(model.parameters(), lr=1.0), (3, 8, 8), 3, torch.device("cpu"))
    limit_at = FakeDevice(12)

    def try_step(b):  # the real trial step, on a pretend device that holds 12 images
        limit_at(b)
        w = model[4].weight.detach().clone()
        step(b)
        assert not torch.equal(w, model[4].weight) and model.training  # a real optimizer step, in training mode
        assert all(p.grad is None for p in model.parameters())

    with preserved(model):
        assert find_batch_size(try_step, start=4, limit=64, headroom=1.0) == 12
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():  # weights and BatchNorm statistics as they were
        assert torch.equal(v, before[k]), k


# ---- config ------------------------------------------------------------------------------------------------------
def test_config_batch_size_auto_or_a_positive_whole_number(tmp_path):
    assert load_config(None, ["data.batch_size=auto"]).data.batch_size == "auto"
    assert load_config(None, ["data.batch_size=64"]).data.batch_size == 64
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  batch_size: '48'\n")
    assert load_config(recipe).data.batch_size == 48
    cfg = load_config(None, ["data.batch_size=auto"]).data
    assert cfg.eval_batch is None and load_config(None, ["data.batch_size=16"]).data.eval_batch == 32
    assert load_config(None, ["data.batch_size=auto", "data.eval_batch_size=8"]).data.eval_batch == 8
    for bad, shown in (("big", "'big'"), ("0", "0"), ("-3", "-3"), ("Auto", "'Auto'")):
        with pytest.raises(ConfigError, match=rf"^data.batch_size: {shown} is neither a whole number >= 1 nor auto$"):
            load_config(None, [f"data.batch_size={bad}"])
    with pytest.raises(ConfigError, match=r"^data.batch_size: "):
        load_config(None, ["data.batch_size=1.5"])
