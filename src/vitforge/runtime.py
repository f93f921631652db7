"""Where and how code runs: the device choice, the one mixed-precision policy, and the process-group helpers
(torchrun environment, rank-0 gating, reductions and gathers over ranks)."""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vitforge.errors import ConfigError

_IMPORTED = time.monotonic()  # fallback start of the process where the OS does not say (imported early by the CLI)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group that `torchrun` describes in the environment (no-op for a single process).

    NCCL for CUDA, gloo otherwise (CPU tests run 2 gloo processes).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def pick_device(spec: str, info: DistInfo, option: str = "train.device") -> torch.device:
    """`auto` = CUDA -> MPS -> CPU; under torchrun each process takes cuda:LOCAL_RANK. A device that is not there
    (or not a device) is a ConfigError naming `option`."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{option}: {spec!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"{option}: {spec} requested but CUDA is not available here (torch {torch.__version__}"
                              f"{', built without CUDA' if torch.version.cuda is None else ', no GPU visible'}); "
                              f"use cpu or auto")
        if info.enabled and dev.index is None:
            dev = torch.device("cuda", info.local_rank)
        if (dev.index or 0) >= n:
            raise ConfigError(f"{option}: {dev} requested but only {n} CUDA device(s) are visible")
    elif dev.type == "mps" and not _mps_available():
        raise ConfigError(f"{option}: mps requested but Apple's MPS backend is not available here; use cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{option}: {spec!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


def inference_device(spec: str, option: str = "--device") -> torch.device:
    """The device of a single-process command (eval, predict, export, serve): `pick_device` without torchrun."""
    return pick_device(spec, DistInfo(), option=option)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision policy, for training and inference alike.

    `auto` is bfloat16 on CUDA (same exponent range as float32, so no loss scaling) and full precision elsewhere;
    `bf16` / `fp16` force that dtype (fp16 training needs a GradScaler); `off` is full precision.
    `auto` stays full precision on a CPU, also one with native bf16 (`cpu_has_bf16`): bf16 autocast sped the
    Mini-ViT CIFAR training step up 1.32x on an avx512_bf16 CPU (`benchmarks/results/cpu_levers_cpu.json`, lever
    `amp_bf16`), but it changes the numbers and its effect on accuracy is not measured yet; `bf16` turns it on.
    """
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode in ("auto", "bf16"):
        return torch.bfloat16
    return torch.float16


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags in /proc/cpuinfo; ARM lists `bf16` under Features


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bfloat16 natively (x86 `avx512_bf16` / `amx_bf16`, ARMv8.6 `bf16`), read from
    /proc/cpuinfo (or `cpuinfo`, its text); False where it cannot be read (macOS, Windows). Without it, bf16 autocast
    on a CPU converts to float32 and back around every matmul: slower than full precision."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words = set(value.split())
            if words & set(BF16_CPU_FLAGS) or (key.strip() == "Features" and "bf16" in words):
                return True
    return False


def autocast(device: torch.device, dtype: torch.dtype | None):
    """A context manager running the block under autocast to `dtype` on `device` (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def device_kind(spec: str) -> str:
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(spec).type


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's first axis over ranks (uneven lengths allowed), on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros((m, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a one-element list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy every floating-point buffer (e.g. BatchNorm running statistics) of `module` from rank `src`."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.broadcast(b, src=src)


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (picklable plain data: a decision taken once, e.g. the train.budget plan);
    `obj` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on `device` is done (CUDA, MPS), so that a clock read afterwards measures it; a
    no-op on the CPU, which runs each op before returning."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def process_age() -> float:
    """Seconds since this process started (interpreter start-up and imports included), from the kernel's process
    start time on Linux (/proc/self/stat field 22, in clock ticks since boot, against /proc/uptime); elsewhere the
    time since `vitforge.runtime` was imported."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 10 * 365 * 86400:
            return age
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    return time.monotonic() - _IMPORTED


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def release_memory() -> None:
    """Free what dropped objects still hold: collect reference cycles (`gc.collect`: a model, optimizer or loader
    caught in one is otherwise freed only at some later collection, its worker processes joined with it) and return
    the CUDA caching allocator's unused blocks to the driver (`torch.cuda.empty_cache`, only when CUDA was
    initialised in this process), so that the next K-fold fold or model starts from the memory the previous one
    started from. Callers drop their references first; this frees nothing that is still referenced."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def usable_cpus() -> int:
    """CPU cores this process may use: its affinity mask (`taskset`, a container's cpuset; not the machine's core
    count), further limited by a cgroup CPU quota (`docker --cpus`, Kubernetes limits: cgroup v2 `cpu.max`, v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up; `os.cpu_count()` where there is no affinity call."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.ceil(quota)) if quota else n)


def _cgroup_quota() -> float | None:
    """CPUs allowed by this process's cgroup quota, None when unlimited or unknown."""
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda t: t.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):
        try:
            text = open(path).read().strip()
            if parse:
                quota, period = parse(text)
            else:
                quota, period = text, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read().strip()
            if quota in ("max", "-1") or int(period) <= 0:
                return None
            return int(quota) / int(period)
        except (OSError, ValueError):
            continue
    return None


_GLIBC_M_TRIM_THRESHOLD, _GLIBC_M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest allowed on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def prepare_cpu_inference() -> dict:
    """Settings for a forward-only workload on the CPU (eval, predict, TTA), applied to this process:

    - intra-op threads: at most the usable cores (`usable_cpus`; PyTorch counts the machine's cores, which in a
      container with a CPU quota oversubscribes it), never raised above a lower setting the caller chose;
    - memory: freed blocks stay in the process for the next forward pass. By default glibc serves each activation
      over its dynamic mmap threshold with a fresh `mmap`, unmaps it on free and trims the heap top back to the
      kernel, so every forward pass of every TTA view faults its activations in again, page by page (system CPU
      time). Fixing the mmap threshold at its maximum (32 MiB) and the trim threshold at 1 GiB (`mallopt`, glibc
      only; elsewhere nothing changes) keeps blocks below 32 MiB: 24 passes of 4 images at 224 px (EfficientNet-Lite0)
      measured 453k minor page faults before, 3k after (`benchmarks/results/eval_tta_passes_cpu.json`). RSS then
      stays at its peak.
      Worker processes forked afterwards inherit the setting.

    Returns {"threads": int, "malloc": bool}: what is in effect.
    """
    return {"threads": cap_cpu_threads(), "malloc": _keep_freed_memory()}


def cap_cpu_threads() -> int:
    """Lower PyTorch's intra-op threads to the usable cores (`usable_cpus`) when it uses more, never raise them;
    returns the count in effect. PyTorch starts with the machine's core count, which in a container with a CPU quota
    or under `taskset` runs more threads than there are cores: they time-slice one another, and OpenMP's barriers
    wait on descheduled threads."""
    cores = usable_cpus()
    if torch.get_num_threads() > cores:
        torch.set_num_threads(cores)
    return torch.get_num_threads()


def _keep_freed_memory() -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_GLIBC_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
            libc.mallopt(_GLIBC_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
