"""bf16 on a CPU: read from cpuinfo, never chosen by `auto`, an explicit request without it is named."""

from __future__ import annotations

import torch

from vitforge import runtime
from vitforge.config import load_config
from vitforge.train.setup import build

X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw{}\nbogomips\t: 4800\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd sve{}\nCPU implementer\t: 0x41\n"


def test_cpu_has_bf16_reads_the_flags():
    assert runtime.cpu_has_bf16(X86.format(" avx512_bf16 avx512_vnni"))
    assert runtime.cpu_has_bf16(X86.format(" amx_bf16 amx_tile"))
    assert not runtime.cpu_has_bf16(X86.format(""))
    assert not runtime.cpu_has_bf16(X86.format(" avx512_fp16"))  # fp16, not bf16
    assert runtime.cpu_has_bf16(ARM.format(" bf16 i8mm"))
    assert not runtime.cpu_has_bf16(ARM.format(""))
    assert not runtime.cpu_has_bf16("model name\t: bf16 avx512_bf16 in a name, not a flag\n")
    assert not runtime.cpu_has_bf16("")


def test_auto_never_picks_bf16_on_a_cpu(monkeypatch):
    cpu = torch.device("cpu")
    for has in (True, False):
        monkeypatch.setattr(runtime, "cpu_has_bf16", lambda cpuinfo=None, has=has: has)
        assert runtime.amp_dtype("auto", cpu) is None
    assert runtime.amp_dtype("bf16", cpu) is torch.bfloat16  # asked for explicitly


def test_explicit_bf16_on_a_cpu_without_it_is_announced(monkeypatch):
    base = ["model.name=vit_demo", "data.train=digits", "data.limit=64", "data.val_split=0", "data.batch_size=16",
            "train.device=cpu", "run.progress=none", "train.threads=1"]
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda cpuinfo=None: False)
    assert any("without native bf16" in n for n in build(load_config(None, [*base, "train.amp=bf16"])).notes)
    assert not any("bf16" in n for n in build(load_config(None, [*base, "train.amp=off"])).notes)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda cpuinfo=None: True)
    assert not any("bf16" in n for n in build(load_config(None, [*base, "train.amp=bf16"])).notes)
