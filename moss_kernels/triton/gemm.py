"""A dense GEMM with a second fused product, a bias epilogue and route-aware tile skipping.

    out[M, N] = A[M, K] @ B[K, N]  (+ A2[M, K2] @ B2[K2, N])  (+ bias[N])       fp32 accumulate

The MOSS layer uses it three times, four with an ``x_adapter`` (``C = R_t + K*K*R_i`` columns
of tap products; the tap products then read x_adapter):

* tap products  ``P = x @ A_all^T``  [N, C] with ``ROUTE_SKIP``: an M-tile that holds no text
  token skips the text columns (< R_T), one that holds no image token skips the tap columns.
  Images are long contiguous runs (1,024 tokens for Chameleon), so at half image tokens about
  half of the tap work disappears; the skipped entries are never read (the routing kernel reads
  text columns only on text rows and tap columns only on image rows), so they stay unset.
* forward       ``y = x @ W^T + z @ Bcat^T + b``: the adapter expand is a second reduction
  loop into the same accumulator, so y is written once (no second pass over [N, D_out]).
* backward      ``dx = dy @ W + dP @ A_all``: the transposed convolution (already gathered
  into dP in rank space) folded into the ``dy W`` GEMM the same way. With an ``x_adapter``,
  ``dx_adapter = dP @ A_all`` is a launch of its own (and ``dx = dy @ W`` cuBLAS's).

In the last two the second product (in ``dx_adapter`` the only one) runs on the finite part of
the adapter weights (pack.py), and with ``POISON`` the epilogue puts NaN back on exactly the rows
of the route whose weight column held a NaN or Inf (``bad [2, N]`` flags, ``route`` of the M
rows): a full-width product would put 0 * NaN on every other route's rows too (docs/design.md
section 3).

Operands are read through their strides, so transposed views (``W^T``) cost nothing. Rows,
columns and the K steps are offset in int64 (N * D can pass 2^31, and so can BLOCK_K row
strides of a transposed operand). Out-of-range rows and columns are read modulo M / N (always in
bounds, no load masks on the hot loop) and masked at the store, as in Triton's matmul tutorial;
only the K tail is masked.

Operands of different dtypes (an fp32 rank-space intermediate: z, and for fp16 inputs also P, dz
and dP, times a half-precision weight or activation) meet in a bf16 dot when the half type is
bf16, as a bf16 LoRA would (bf16 has fp32's range), and in a tf32 dot when it is fp16: fp16 tops
out at 65504, which tap products and their routed sums can pass while the layer's outputs fit
(issue #9), and tf32 has fp16's 10-bit mantissa with fp32's range, so it is no less precise than
the fp16 dot it replaces. tf32 runs at half the fp16 tensor-core rate; in the fused y and dx
GEMMs that touches only the second, R-long reduction.

Autotuning runs only on a GPU, keyed on sizes bucketed to powers of two (a new batch length
re-benchmarks, with a device sync, only when it crosses a power of two, and CUDA-graph capture
of a step is not broken by a first-seen length). ``MOSS_TRITON_AUTOTUNE=0`` runs one config
without benchmarking (tests, the GPU check); the interpreter (TRITON_INTERPRET=1) always does.
``MOSS_KERNELS_POISON=1`` starts every output as NaN instead of uninitialised memory, so that an
element a kernel fails to write shows (the tests set it: on a CPU fresh memory is zero, on a GPU
it is stale).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("MOSS_TRITON_AUTOTUNE", "1") != "0" and not INTERPRET
POISON = os.environ.get("MOSS_KERNELS_POISON") == "1"

#: Tile shapes to autotune over on a GPU (Hopper-sized first): BLOCK_M, BLOCK_N, BLOCK_K,
#: num_warps, num_stages. Those whose buffers would not fit a block's shared memory for the
#: operands' dtypes are pruned before a launch benchmarks them (:func:`fitting`).
SHAPES = [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
          (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 32, 64, 4, 4)]
#: The one used without autotuning on a GPU: fits every dtype (fp32 operands: 196,608 bytes).
DEFAULT_SHAPE = (128, 128, 64, 8, 3)
#: Shared memory one block may use on sm_90 (the H200), bytes.
SHARED_LIMIT = 232_448


def tile_configs(shapes) -> list[triton.Config]:
    """GPU tile configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) shapes."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for m, n, k, w, s in shapes]


def configs(autotune: bool = AUTOTUNE) -> list[triton.Config]:
    """Tile shapes to autotune over; one without autotuning (small when interpreting)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 4},
                              num_warps=4, num_stages=1)]
    return tile_configs(SHAPES if autotune else [DEFAULT_SHAPE])


def shared_bytes(kwargs: dict, num_stages: int, dtypes: tuple[torch.dtype, ...]) -> int:
    """The software pipeline's buffers for operands of ``dtypes`` (A, B, A2, B2):
    ``num_stages`` A and B tiles of the larger K loop, and for a loop that meets fp16 with fp32
    (converted to fp32 in registers) one more B tile. compile_check checks every config's
    compiled figure against this one."""
    m, n, k = kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"]

    def loop(x: torch.dtype, y: torch.dtype) -> int:
        mixed = {x, y} == {torch.float16, torch.float32}
        return (num_stages * (m * k * x.itemsize + k * n * y.itemsize)
                + (k * n * y.itemsize if mixed else 0))

    return max(loop(dtypes[0], dtypes[1]), loop(dtypes[2], dtypes[3]))


def fitting(configs: list[triton.Config], named_args: dict, **_) -> list[triton.Config]:
    """The configs whose buffers fit a block's shared memory for these operands' dtypes (a
    larger one fails at launch: fp32 operands in 128 x 256 x 64 tiles, 3 stages, need 294,912
    bytes); the smallest if none does."""
    dtypes = tuple(named_args[p].dtype for p in ("a_ptr", "b_ptr", "a2_ptr", "b2_ptr"))
    fit = [c for c in configs if shared_bytes(c.kwargs, c.num_stages, dtypes) <= SHARED_LIMIT]
    return fit or [min(configs, key=lambda c: shared_bytes(c.kwargs, c.num_stages, dtypes))]


def bucket(n: int) -> int:
    """What the autotuner keys on instead of a size: its power-of-two ceiling."""
    return triton.next_power_of_2(max(int(n), 1))


def empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """A kernel's output: uninitialised, or NaN under MOSS_KERNELS_POISON=1."""
    if POISON and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(*shape, dtype=dtype, device=device)


@triton.jit
def _accumulate(acc, a_ptr, b_ptr, rows, cols, K, stride_am, stride_ak, stride_bk, stride_bn,
                BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """acc += A[rows, :K] @ B[:K, cols], BLOCK_K at a time."""
    offs_k = tl.arange(0, BLOCK_K)
    # int64 like rows and cols: a transposed operand (dy^T, dP^T) steps K by a row stride,
    # which a view may make large enough that BLOCK_K of them pass 2^31: the offsets and the
    # steps are int64 products (an int32 one wraps).
    k64 = offs_k.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + k64[None, :] * stride_ak
    b_ptrs = b_ptr + k64[:, None] * stride_bk + cols[None, :] * stride_bn
    step = tl.full((), BLOCK_K, tl.int64)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if a.dtype == b.dtype:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        elif (a.dtype == tl.float16) | (b.dtype == tl.float16):
            # fp16 meets an fp32 rank-space intermediate: in tf32, which keeps fp16's 10-bit
            # mantissa but has fp32's range (the intermediate may exceed 65504).
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
        elif a.dtype == tl.float32:
            acc = tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)  # bf16: fp32's range
        else:
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        a_ptrs += step * stride_ak
        b_ptrs += step * stride_bk
    return acc


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr,            # A [M, K], B [K, N]
    a2_ptr, b2_ptr,          # A2 [M, K2], B2 [K2, N] (read only if HAS_A2)
    bias_ptr,                # [N] (read only if HAS_BIAS)
    route_ptr,               # [M] int8 token routes (read only if ROUTE_SKIP or POISON)
    bad_ptr,                 # [2, N] uint8: route r's weight column j held a NaN / Inf (POISON)
    out_ptr,                 # [M, N]
    M, N, K, K2,
    R_T,                     # ROUTE_SKIP: columns < R_T are text columns, the rest tap columns
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_om, stride_on,
    M_BUCKET, N_BUCKET, K_BUCKET, K2_BUCKET,  # what autotuning is keyed on (unused otherwise)
    HAS_A2: tl.constexpr, HAS_BIAS: tl.constexpr, ROUTE_SKIP: tl.constexpr,
    POISON: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 operands only)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each column panel of B while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)

    needed = True
    if ROUTE_SKIP:
        route = tl.load(route_ptr + offs_m, mask=offs_m < M, other=-1)
        has_text = tl.max((route == 0).to(tl.int32), axis=0) > 0
        has_image = tl.max((route == 1).to(tl.int32), axis=0) > 0
        first_col = pid_n * BLOCK_N
        needed = ((first_col < R_T) & has_text) | ((first_col + BLOCK_N > R_T) & has_image)
    if needed:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _accumulate(acc, a_ptr, b_ptr, rows, cols, K, stride_am, stride_ak, stride_bk,
                          stride_bn, BLOCK_K, PRECISION)
        if HAS_A2:
            acc = _accumulate(acc, a2_ptr, b2_ptr, rows, cols, K2, stride_a2m, stride_a2k,
                              stride_b2k, stride_b2n, BLOCK_K, PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        if POISON:
            row_route = tl.load(route_ptr + offs_m, mask=offs_m < M, other=-1)
            bad_text = tl.load(bad_ptr + cols) != 0
            bad_image = tl.load(bad_ptr + N + cols) != 0
            bad = (((row_route == 0)[:, None] & bad_text[None, :])
                   | ((row_route == 1)[:, None] & bad_image[None, :]))
            acc = tl.where(bad, float("nan"), acc)
        out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# With a single config autotune launches it without benchmarking (or pruning).
_gemm = triton.autotune(configs=configs(), key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "K2_BUCKET",
                                                "HAS_A2", "HAS_BIAS", "ROUTE_SKIP", "POISON"],
                        prune_configs_by={"early_config_prune": fitting})(_gemm_kernel)


def precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 dots honour torch's TF32 switch, as F.linear does; half types ignore it."""
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if dtype == torch.float32 and tf32 else "ieee"


def launch_gemm(a: torch.Tensor, b: torch.Tensor, a2: torch.Tensor | None = None,
                b2: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                route: torch.Tensor | None = None, r_t: int = 0,
                out_dtype: torch.dtype | None = None,
                poison: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``a @ b (+ a2 @ b2) (+ bias)`` in ``out_dtype`` (default ``a.dtype``); with ``route``,
    the tap-product skipping; with ``poison = (route, bad)``, NaN where ``bad[route[row]]``."""
    m, k = a.shape
    n = b.shape[1]
    out = empty(m, n, dtype=out_dtype or a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    has_a2 = a2 is not None and a2.shape[1] > 0
    a2_, b2_ = (a2, b2) if has_a2 else (a, b)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    k2 = a2_.shape[1] if has_a2 else 0
    rows, bad = poison if poison is not None else (route, None)
    _gemm[grid](
        a, b, a2_, b2_, a if bias is None else bias, a if rows is None else rows,
        a if bad is None else bad, out,
        m, n, k, k2, r_t,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        a2_.stride(0), a2_.stride(1), b2_.stride(0), b2_.stride(1),
        out.stride(0), out.stride(1),
        bucket(m), bucket(n), bucket(k), bucket(k2),
        HAS_A2=has_a2, HAS_BIAS=bias is not None, ROUTE_SKIP=route is not None,
        POISON=poison is not None, PRECISION=precision(a.dtype, a.device),
    )
    return out
