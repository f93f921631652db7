"""Selective scan (Mamba's S6 recurrence) in pure PyTorch, three ways, with mamba_ssm's CUDA kernel as an option.

Semantics are those of `selective_scan_ref` in state-spaces/mamba `mamba_ssm/ops/selective_scan_interface.py` (Gu &
Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752), for
u, δ: (B, D, L), A: (D, N) real, B/C: (D, N) constant, (B, N, L) selective or (B, G, N, L) grouped:

    δ = softplus(δ + δ_bias)                      (each step optional)
    h_t = exp(δ_t A) ⊙ h_{t-1} + δ_t B_t u_t      h_{-1} = 0; "ZOH for A, Euler for B" -- do not "fix" to exact ZOH
    y_t = <C_t, h_t> + D u_t,  y ← y · SiLU(z)    (D, z optional)

Forms (identical results up to rounding; tests hold them to 1e-10 in float64):

* `loop`: the sequential reference, one step per token: the cheapest forward on CPU (small, cache-resident steps),
  but an autograd graph of L steps and L kernel launches per op on a GPU.
* `chunked`: segment sums. Within a chunk of T tokens h_t = e^{S_t} h_in + Σ_{τ≤t} e^{S_t − S_τ} δ_τ B_τ u_τ with
  S the inclusive cumsum of δA; the T x T weights are masked to −inf *before* exp (exp of the positive upper
  triangle overflows and turns gradients through a `where` into NaN). Chunk-entry states are carried by a short
  doubling scan over the chunks. Memory O(B·D·L·T·N).
* `doubling`: Hillis–Steele associative scan over pairs (a, b) with (a1, b1)∘(a2, b2) = (a1 a2, a2 b1 + b2);
  ceil(log2 L) steps of full-tensor ops. Memory O(B·D·L·N) per step.

`selective_scan_fn` dispatches (`impl="auto"`, rules in `resolve_impl`): mamba_ssm's fused kernel on CUDA when it
imports (lazy, never required); on CPU the loop for inference and for training on short windows; the doubling form
for CPU training on long windows, for CUDA without the kernel and for graph capture (ONNX export, tracing, compile).
Every form computes in float32 (float64 stays float64) with autocast off and casts the output back to u's dtype, as
the official model does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

IMPLS = ("auto", "loop", "chunked", "doubling", "cuda")
DEFAULT_CHUNK = 16
# CPU loop vs doubling, forward+backward at MambaVision shapes (benchmarks/results/scan_cpu.json, 1 thread): the loop
# is 1.6x faster at L = 16, within +-20 % at L = 49-64 (the sign flipped between two runs on a loaded machine) and
# 2.1x slower at L = 196. The crossover lies between 64 and 196.
LOOP_MAX_TRAIN_LEN = 64


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    impl: str = "auto",
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan with mamba_ssm's `selective_scan_fn` signature (plus keyword-only `impl`, `chunk_size`).

    Args:
        u: inputs (B, D, L).
        delta: raw step sizes δ (B, D, L).
        A: state matrix (D, N), real (MambaVision passes −exp(A_log)).
        B: input matrix (D, N), (B, N, L) or (B, G, N, L) with G dividing D.
        C: output matrix, same layouts as `B`.
        D: skip weights (D,).
        z: gate (B, D, L); the output is multiplied by SiLU(z).
        delta_bias: added to δ per channel (D,) before the softplus.
        delta_softplus: apply softplus to δ.
        return_last_state: also return h at the last position.
        impl: "auto", "loop", "chunked", "doubling" or "cuda" (mamba_ssm kernel).
        chunk_size: tokens per chunk of the chunked form.

    Returns:
        y (B, D, L) in u's dtype, and with `return_last_state` the state (B, D, N) in the compute dtype.
    """
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias)
    )
    impl = resolve_impl(impl, u, needs_grad)
    if impl == "cuda":
        return _cuda_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    states = {"loop": _states_loop, "doubling": _states_doubling}.get(impl)
    if states is None:
        states = functools.partial(_states_chunked, chunk=chunk_size)
    with _autocast_off(u.device.type):
        y, last = _run(states, u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (y, last) if return_last_state else y


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """The sequential reference form (`impl="loop"`); same arguments as `selective_scan_fn`."""
    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, impl="loop")


def resolve_impl(impl: str, u: torch.Tensor, needs_grad: bool = False) -> str:
    """The concrete form for `impl` ("auto" is resolved; other names are validated and returned).

    "auto", in order:
    1. while ONNX export, TorchScript tracing or torch.compile/torch.export records the graph: `doubling` (a custom
       CUDA op is opaque to them, and the loop would unroll into L copies of its body);
    2. CUDA input in fp32/fp16/bf16 and mamba_ssm imports: its fused kernel (`cuda`);
    3. CPU, and no gradient needed or L <= LOOP_MAX_TRAIN_LEN: `loop`; its per-token steps are small and
       cache-resident (forward 1.6-3.5x faster than doubling at the MambaVision window lengths 16-196; forward+backward
       see LOOP_MAX_TRAIN_LEN; benchmarks/results/scan_cpu.json);
    4. otherwise (CPU training on longer windows, e.g. 196 tokens in T's stage 3, or CUDA without the kernel):
       `doubling`, 2.1x faster than the loop for forward+backward at L = 196 on CPU, and log2(L) kernel launches
       instead of L on a GPU (not measured here: no GPU was available).
    `chunked` is never picked automatically: at these lengths its T x T weights cost more than they save on CPU
    (T = 4 only matches doubling at L = 196; T >= 8 is slower everywhere).
    """
    if impl not in IMPLS:
        raise ValueError(f"selective scan impl must be one of {IMPLS}, got {impl!r}")
    if impl == "cuda" and not _kernel_usable(u):
        raise RuntimeError("selective scan impl 'cuda' needs a CUDA fp32/fp16/bf16 input and an importable mamba_ssm")
    if impl != "auto":
        return impl
    if _graph_capture():
        return "doubling"
    if _kernel_usable(u):
        return "cuda"
    if u.device.type == "cpu" and (not needs_grad or u.shape[-1] <= LOOP_MAX_TRAIN_LEN):
        return "loop"
    return "doubling"


# ---- shared pre/post-processing ------------------------------------------------------------------------------------
def _run(states: Callable, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Discretise, run one state form, read out. Returns y (B, D, L) in u's dtype and the last state (B, D, N)."""
    if A.is_complex():
        raise ValueError("selective scan: complex A is not supported (MambaVision and Mamba-1 vision use real A)")
    dtype = torch.promote_types(u.dtype, torch.float32)  # fp16/bf16/fp32 -> fp32, fp64 stays fp64
    _, Dch, L = u.shape
    uf, dt = u.to(dtype), delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    Bx = _expand_bc(B.to(dtype), Dch, L)  # (B|1, D|1, L, N)
    Cx = _expand_bc(C.to(dtype), Dch, L)
    log_a = dt[..., None] * A.to(dtype)[:, None, :]  # (B, D, L, N) = δA <= 0: log of the per-step decay
    bu = (dt * uf)[..., None] * Bx  # (B, D, L, N) = δ B u
    h = states(log_a, bu)  # (B, D, L, N) states at every position
    y = (h * Cx).sum(-1)  # (B, D, L)
    if D is not None:
        y = y + uf * D.to(dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(u.dtype), h[:, :, -1]


def _expand_bc(M: torch.Tensor, channels: int, L: int) -> torch.Tensor:
    """B or C in any mamba_ssm layout -> a tensor broadcastable to (B, D, L, N)."""
    if M.dim() == 2:  # (D, N): time-invariant
        return M[None, :, None, :].expand(1, channels, L, M.shape[-1])
    if M.dim() == 3:  # (B, N, L): one selective matrix shared by all channels
        return M.transpose(1, 2)[:, None]  # (B, 1, L, N)
    groups = M.shape[1]  # (B, G, N, L): channel d uses group d // (D / G)
    if channels % groups:
        raise ValueError(f"selective scan: {groups} groups do not divide {channels} channels")
    return M.transpose(2, 3).repeat_interleave(channels // groups, dim=1)  # (B, D, L, N)


@contextlib.contextmanager
def _autocast_off(device_type: str):
    """The recurrence must not run in half precision; leave autocast untouched when it is off (keeps export simple)."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


# ---- the three forms: (log_a, bu) each (B, D, L, N) -> all states h (B, D, L, N) ------------------------------------
def _states_loop(log_a: torch.Tensor, bu: torch.Tensor) -> torch.Tensor:
    """Sequential reference: h_t = a_t h_{t-1} + bu_t, one token at a time."""
    a = log_a.exp()
    h = torch.zeros_like(bu[:, :, 0])  # (B, D, N)
    out = []
    for t in range(bu.shape[2]):
        h = a[:, :, t] * h + bu[:, :, t]
        out.append(h)
    return torch.stack(out, dim=2)


def _states_doubling(log_a: torch.Tensor, bu: torch.Tensor) -> torch.Tensor:
    """Hillis–Steele inclusive scan along dim 2 (L): after step k, position t holds the composite of (t - 2k, t]."""
    return _doubling(log_a.exp(), bu, dim=2)


def _doubling(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """All prefix states of h_t = a_t h_{t-1} + b_t along `dim` (h_{-1} = 0) in ceil(log2 L) steps.

    The step count is a Python loop over L, so a traced/exported graph is specific to L. In MambaVision L is the window
    area (ws²), fixed by the model whatever the input size or batch, so the TracerWarning on export is harmless.
    """
    L = b.shape[dim]
    k = 1
    while k < L:
        b = b + a * _shift(b, k, dim, fill=0.0)  # earlier segment's state, carried through this segment's decay
        if 2 * k < L:  # the decay products are not needed after the last step
            a = a * _shift(a, k, dim, fill=1.0)
        k *= 2
    return b


def _shift(x: torch.Tensor, k: int, dim: int, fill: float) -> torch.Tensor:
    """x shifted by k positions towards the end along `dim`, the first k filled with `fill` (identity element)."""
    head = x.narrow(dim, 0, x.shape[dim] - k)
    pad = [0, 0] * (x.dim() - 1 - dim) + [k, 0]  # F.pad lists the last dimension first
    return F.pad(head, pad, value=fill)


def _states_chunked(log_a: torch.Tensor, bu: torch.Tensor, chunk: int) -> torch.Tensor:
    """Segment-sum form: dense T x T decay weights inside each chunk, a doubling scan across chunk boundaries."""
    Bsz, Dch, L, N = bu.shape
    T = max(1, min(chunk, L))
    nc = -(-L // T)
    if nc * T != L:  # zero padding at the end: a = e^0 = 1, bu = 0 leaves every earlier state unchanged
        log_a, bu = (F.pad(t, (0, 0, 0, nc * T - L)) for t in (log_a, bu))
    S = log_a.reshape(Bsz, Dch, nc, T, N).cumsum(3)  # (B, D, nc, T, N) inclusive segment sums
    x = bu.reshape(Bsz, Dch, nc, T, N)
    seg = S[:, :, :, :, None] - S[:, :, :, None]  # (B, D, nc, T_t, T_τ, N) = S_t - S_τ
    causal = torch.ones(T, T, dtype=torch.bool, device=bu.device).tril()[..., None]  # (T_t, T_τ, 1)
    w = seg.masked_fill(~causal, float("-inf")).exp()  # −inf before exp: no overflow, no NaN gradients
    # Elementwise product + sum, not a matmul: N is a batch dimension of tiny T x T products (slower as bmm on CPU).
    h_local = (w * x[:, :, :, None]).sum(4)  # (B, D, nc, T, N): states if each chunk started from zero
    # State entering chunk c: the same recurrence over chunks, with decay e^{S_end} and input h_local at the end.
    ends = _doubling(S[:, :, :, -1].exp(), h_local[:, :, :, -1], dim=2)  # (B, D, nc, N) true states at chunk ends
    h_in = F.pad(ends[:, :, :-1], (0, 0, 1, 0))  # (B, D, nc, N), zero entering chunk 0
    h = h_local + S.exp() * h_in[:, :, :, None]  # (B, D, nc, T, N)
    return h.reshape(Bsz, Dch, nc * T, N)[:, :, :L]


# ---- optional fused kernel ------------------------------------------------------------------------------------------
@functools.cache
def _mamba_kernel() -> Callable | None:
    """mamba_ssm's `selective_scan_fn`, or None. Imported lazily: the package needs a CUDA build and is optional."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as kernel
    except (ImportError, OSError, RuntimeError):  # not installed, or a CUDA extension that fails to load
        return None
    return kernel


def kernel_available() -> bool:
    """Whether mamba_ssm's fused selective-scan kernel can be imported here."""
    return _mamba_kernel() is not None


def _kernel_usable(u: torch.Tensor) -> bool:
    ok_dtype = u.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return u.is_cuda and ok_dtype and kernel_available()


def _graph_capture() -> bool:
    """True while ONNX export, TorchScript tracing or torch.compile/torch.export records the graph."""
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing() or torch.compiler.is_compiling()


def _cuda_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    kernel = _mamba_kernel()
    D = D.float() if D is not None else None  # the kernel wants fp32 D and δ-bias (as MambaVision passes them)
    delta_bias = delta_bias.float() if delta_bias is not None else None
    args = (u.contiguous(), delta.contiguous(), A.float(), B.contiguous(), C.contiguous(), D)
    return kernel(*args, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  return_last_state=return_last_state)
