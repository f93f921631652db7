"""`vitforge.runtime`: device choice (and its one-line errors), the AMP policy, and the process-group helpers
(no-ops in one process; uneven gathers, sums, object gathers and buffer broadcasts over 2 gloo processes)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from vitforge import runtime
from vitforge.errors import ConfigError
from vitforge.runtime import DistInfo, amp_dtype, autocast, inference_device, pick_device


def test_dist_info():
    assert DistInfo() == DistInfo(0, 1, 0) and not DistInfo().enabled and DistInfo().main
    assert DistInfo(rank=1, world=2, local_rank=1).enabled and not DistInfo(1, 2, 1).main


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime.init_distributed("cpu") == DistInfo()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runtime.init_distributed("cpu") == DistInfo() and not dist.is_initialized()
    t = torch.arange(6.0).reshape(3, 2)
    assert runtime.gather_cat(t) is t and runtime.all_reduce_sum(t) is t
    assert runtime.gather_objects({"a": 1}) == [{"a": 1}]
    runtime.broadcast_buffers(nn.BatchNorm1d(2))
    runtime.barrier()
    runtime.cleanup()


def test_cpu_and_auto_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_mps_available", lambda: False)
    assert pick_device("auto", DistInfo()) == torch.device("cpu")
    assert pick_device("cpu", DistInfo()) == torch.device("cpu")
    assert runtime.device_kind("auto") == "cpu"


@pytest.mark.parametrize("spec, option, message", [
    ("gpu0", "train.device", "train.device: 'gpu0' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ("meta", "train.device", "train.device: 'meta' is not supported; use auto, cpu, cuda, cuda:N or mps"),
    ("cuda", "--device", "--device: cuda requested but CUDA is not available here (torch "),
    ("cuda:1", "train.device", "train.device: cuda:1 requested but CUDA is not available here"),
    ("mps", "--device", "--device: mps requested but Apple's MPS backend is not available here; use cpu or auto"),
])
def test_devices_that_are_not_here_are_named(spec, option, message, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "_mps_available", lambda: False)
    with pytest.raises(ConfigError) as e:
        (inference_device(spec) if option == "--device" else pick_device(spec, DistInfo()))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_cuda_choice_with_visible_gpus(monkeypatch):
    """Two visible GPUs (simulated): torchrun ranks take cuda:LOCAL_RANK; an index past the last one is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    ddp = DistInfo(rank=3, world=4, local_rank=1)
    assert pick_device("auto", ddp) == torch.device("cuda", 1)
    assert pick_device("cuda", ddp) == torch.device("cuda", 1)
    assert pick_device("cuda", DistInfo()) == torch.device("cuda")
    assert pick_device("cuda:0", ddp) == torch.device("cuda", 0)  # an explicit index is kept
    with pytest.raises(ConfigError, match=r"^train.device: cuda:2 requested but only 2 CUDA device\(s\) are visible$"):
        pick_device("cuda:2", DistInfo())


@pytest.mark.parametrize("mode, device, want", [
    ("auto", "cpu", None), ("auto", "cuda", torch.bfloat16), ("auto", "mps", None),
    ("bf16", "cpu", torch.bfloat16), ("fp16", "cuda", torch.float16), ("off", "cuda", None),
])
def test_amp_policy(mode, device, want):
    assert amp_dtype(mode, torch.device(device)) is want


def test_autocast_context():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), None):
        assert (a @ b).dtype == torch.float32
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    assert (a @ b).dtype == torch.float32


# ---- two gloo processes -----------------------------------------------------------------------------------------
def _rank_main(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    info = runtime.init_distributed("cpu")
    rows = torch.arange(3 if rank == 0 else 1, dtype=torch.float32)[:, None] + 10 * rank  # 3 rows vs 1 row
    gathered = runtime.gather_cat(rows.repeat(1, 2))
    empty_on_1 = runtime.gather_cat(torch.ones(2 if rank == 0 else 0, 3))
    total = runtime.all_reduce_sum(torch.tensor([rank + 1.0]))
    objs = runtime.gather_objects({"rank": rank})
    decided = runtime.broadcast_object({"steps": 100 + rank})  # rank 0's decision everywhere
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(float(rank) + 5)
    bn.num_batches_tracked.fill_(rank)
    runtime.broadcast_buffers(bn)
    runtime.barrier()
    runtime.cleanup()
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "info": [info.rank, info.world, info.local_rank], "gathered": gathered.tolist(),
        "empty_on_1": list(empty_on_1.shape), "total": total.item(), "objs": objs, "decided": decided,
        "bn_mean": bn.running_mean.tolist(), "bn_count": bn.num_batches_tracked.item(),
        "still_initialized": dist.is_initialized()}))


def test_process_group_helpers_over_two_gloo_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["info"] == [0, 2, 0] and r1["info"] == [1, 2, 1]
    for r in (r0, r1):  # every rank gets the same, complete answer
        assert r["gathered"] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [10.0, 10.0]]  # uneven lengths, rank order
        assert r["empty_on_1"] == [2, 3] and r["total"] == 3.0
        assert r["objs"] == [{"rank": 0}, {"rank": 1}] and r["decided"] == {"steps": 100}
        assert r["bn_mean"] == [5.0, 5.0] and not r["still_initialized"]  # float buffers from rank 0
    assert (r0["bn_count"], r1["bn_count"]) == (0, 1)  # integer buffers are left alone


def test_usable_cpus_follow_affinity_and_a_cgroup_quota(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: None)
    assert runtime.usable_cpus() == affinity
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 0.5)  # docker --cpus=0.5
    assert runtime.usable_cpus() == 1
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: affinity + 7.0)  # a quota above the cpuset: the cpuset
    assert runtime.usable_cpus() == affinity


def test_prepare_cpu_inference_caps_threads_and_keeps_freed_memory(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(runtime, "usable_cpus", lambda: 1)
        torch.set_num_threads(3)
        assert runtime.prepare_cpu_inference() == {"threads": 1, "malloc": sys.platform == "linux"}
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
        assert runtime.prepare_cpu_inference()["threads"] == 1  # a lower setting the caller chose is kept
    finally:
        torch.set_num_threads(before)


def test_process_age_counts_from_the_process_start():
    """The CLI's train.budget counts start-up too: a process that waits before importing vitforge reports an age that
    includes the wait (the kernel's start time, not the import time)."""
    code = "import time; time.sleep(0.6); from vitforge import runtime; print(runtime.process_age())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert float(out) >= 0.6
    assert runtime.broadcast_object({"steps": 3}) == {"steps": 3}  # no process group: the object itself
    runtime.synchronize(torch.device("cpu"))  # nothing queued on a CPU
